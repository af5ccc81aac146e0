//! The validated, typed policy. [`Policy::load`] turns the raw
//! [`crate::config::Config`] into this; nothing after load sees raw config.
//!
//! Validation collects *every* problem instead of stopping at the first, so
//! an operator fixes a policy in one round trip. Each problem names the
//! file, line, column and key path (`FILE:LINE:COL: key.path: message`).
//!
//! Features that are not built yet are refused with "not supported yet"
//! unless the value turns them off: accepting a key and then ignoring it
//! would make an operator believe it is enforced.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use crate::config::{self, Config, LogFormat, Mode, OnFailure, SizeValue, Str, Tri};
use crate::guard::jwt::{self, Jwt};
use crate::guard::origin::OriginPolicy;
use crate::sign;
// The value types a policy is made of live in `values`, which the guards
// import too; re-exported here because `Policy`'s fields name them.
use crate::values::size_text;
pub use crate::values::{canonical_ip, parse_duration, parse_rate, BreakerPolicy, Cidr, Rate};
use std::sync::Arc;

/// One problem with the policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: u64,
    pub col: u64,
    pub path: String,
    pub message: String,
}

/// All problems of one policy file, ready to print one per line.
#[derive(Debug, Clone)]
pub struct Problems {
    pub file: String,
    pub list: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.list.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, p.line, p.col, p.path, p.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Everything the proxy enforces, fully parsed.
#[derive(Debug, Clone)]
pub struct Policy {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// Time between `/readyz` turning 503 and the listener closing on
    /// SIGTERM (an addition to the contract; default 0s).
    pub shutdown_delay: Duration,
    /// `shutdown_close_code` (an addition to the contract): what live
    /// sessions' clients get on SIGTERM, 1001 (default) or 1012.
    pub shutdown_close_code: u16,
    /// TLS termination; None for plain ws://.
    pub tls: Option<TlsPolicy>,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Limits that only make sense for the whole process.
    pub max_connections: u64,
    /// `limits.max_pending_handshakes`: connections still in the handshake
    /// (TLS, request head, upstream dial), all clients together.
    pub max_pending_handshakes: u64,
    /// `limits.per_ip.pending_handshakes`: handshakes in progress per client
    /// IP (after `trusted_proxies`); None = no cap.
    pub per_ip_pending_handshakes: Option<u32>,
    pub handshake_timeout: Duration,
    pub trusted_proxies: Vec<Cidr>,
    /// Per JWT subject (`sub`), across all routes: concurrent sessions and
    /// client-to-backend messages.
    pub per_subject_connections: Option<u32>,
    pub per_subject_messages: Option<Rate>,
    /// `limits.shared`: per-IP handshake rates and per-subject connection
    /// caps across every replica sharing the prefix.
    pub shared: Option<crate::guard::redis_limits::SharedSettings>,
    /// `compression` (contract section 8), for every route: None is
    /// `mode: off` (no extension is negotiated on either hop).
    pub compression: Option<crate::compression::Settings>,
    /// The top-level sections: used when no route matches.
    pub default_route: Route,
    /// `routes`, longest prefix first.
    pub routes: Vec<Route>,
}

/// TLS termination material, loaded and checked at policy load (so `check`
/// and a SIGHUP reload catch bad files).
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    pub server: Arc<rustls::ServerConfig>,
    pub mtls: bool,
    pub client_subject_header: Option<hyper::header::HeaderName>,
}

/// TLS toward a wss:// upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub client: Arc<rustls::ClientConfig>,
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// What applies to the sessions of one path prefix. A route's section
/// replaces the top-level one as a whole.
#[derive(Debug, Clone)]
pub struct Route {
    /// Path prefix ("" for the top level).
    pub prefix: String,
    pub upstream: Upstream,
    pub origin: Option<OriginPolicy>,
    pub jwt: Option<Arc<Jwt>>,
    /// OAuth 2.0 token introspection; never on together with `jwt`.
    pub introspection: Option<Arc<crate::guard::introspect::Introspection>>,
    pub hmac: Option<Hmac>,
    pub keepalive: Keepalive,
    pub limits: Limits,
}

impl Route {
    /// Segment-aware prefix match: `/admin` matches `/admin` and
    /// `/admin/x`, not `/administrator`.
    pub fn matches(&self, path: &str) -> bool {
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || self.prefix.ends_with('/'),
            None => false,
        }
    }
}

impl Policy {
    /// Index of the route for `path` (without query): 0 is the top level,
    /// `i + 1` is `routes[i]`.
    pub fn route_index(&self, path: &str) -> usize {
        self.routes
            .iter()
            .position(|r| r.matches(path))
            .map_or(0, |i| i + 1)
    }

    pub fn route(&self, index: usize) -> &Route {
        index
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.default_route)
    }

    /// Every header wsguard can set anywhere in this policy: the
    /// `forward_claims` targets (jwt and introspection) of every route and
    /// the mTLS subject header
    /// (the fixed ones, `X-Forwarded-*` and friends, are in
    /// [`crate::handshake::DROP`]).
    pub fn asserted_headers(&self) -> Vec<hyper::header::HeaderName> {
        let mut out: Vec<hyper::header::HeaderName> = Vec::new();
        let jwt_claims = self
            .all_routes()
            .filter_map(|r| r.jwt.as_ref())
            .flat_map(|j| j.forward_claims.iter().map(|(_, h)| h.clone()));
        let introspected_claims = self
            .all_routes()
            .filter_map(|r| r.introspection.as_ref())
            .flat_map(|i| i.forward_claims.iter().map(|(_, h)| h.clone()));
        let claims = jwt_claims.chain(introspected_claims);
        let subject = self
            .tls
            .as_ref()
            .and_then(|t| t.client_subject_header.clone());
        for h in claims.chain(subject) {
            if !out.contains(&h) {
                out.push(h);
            }
        }
        out
    }

    /// Every route, the top level first.
    pub fn all_routes(&self) -> impl Iterator<Item = &Route> {
        std::iter::once(&self.default_route).chain(self.routes.iter())
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// The URL as written, used as the metric label and breaker identity.
    pub url: String,
    pub host: String,
    pub port: u16,
    /// Path prefix from the URL, without a trailing slash ("" for none).
    pub base_path: String,
    pub connect_timeout: Duration,
    pub breaker: Option<BreakerPolicy>,
    /// Set for wss:// upstreams.
    pub tls: Option<UpstreamTls>,
}

#[derive(Clone)]
pub struct Hmac {
    pub mode: Mode,
    /// JWT claim whose string value is bound into every signature.
    pub bind_claim: Option<String>,
    /// The fixed client keys: all of them unless some are derived. A
    /// session verifies with [`Hmac::session_client_keys`] when that is
    /// `Some`, else with these.
    pub client_keys: Vec<sign::Key>,
    /// Every client key in policy order, derived ones (`derive: CLAIM`)
    /// included.
    pub all_client_keys: Vec<sign::ClientKey>,
    /// The key wsguard signs with toward the backend: the first of
    /// `hmac.upstream_key` (see [`Hmac::upstream_signing_key`]).
    pub upstream_key: sign::Key,
    /// Every key of `hmac.upstream_key` (one, or several during a
    /// rotation), the signing key first: the backend's messages may be
    /// signed with any (see [`Hmac::upstream_verify_keys`]).
    pub upstream_keys: Vec<sign::Key>,
    pub verify_upstream: bool,
    pub max_skew: Duration,
    pub on_failure: OnFailure,
}

impl Hmac {
    /// The claim values this policy's derived keys need, from a session's
    /// verified token (string claims only).
    pub fn derive_inputs(&self, claims: &jwt::Claims) -> sign::DeriveInputs {
        sign::DeriveInputs::collect(&self.all_client_keys, |name| {
            claims.get(name).and_then(|v| v.as_str())
        })
    }

    /// A session's own client keys when some are derived (None: use
    /// `client_keys` as they are).
    pub fn session_client_keys(&self, inputs: &sign::DeriveInputs) -> Option<Vec<sign::Key>> {
        sign::session_keys(&self.all_client_keys, inputs)
    }

    /// Whether any client key is derived from a token claim.
    pub fn derives(&self) -> bool {
        self.all_client_keys
            .iter()
            .any(|k| matches!(k, sign::ClientKey::Derived(_)))
    }

    /// The key wsguard signs with toward the backend: the first of
    /// `upstream_key`.
    pub fn upstream_signing_key(&self) -> &sign::Key {
        &self.upstream_key
    }

    /// The keys the backend's messages may be signed with: every
    /// `upstream_key`, so a rotation has an overlap window.
    pub fn upstream_verify_keys(&self) -> &[sign::Key] {
        &self.upstream_keys
    }
}

impl fmt::Debug for Hmac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are deliberately omitted: secrets never reach logs.
        f.debug_struct("Hmac")
            .field("mode", &self.mode)
            .field("client_keys", &self.client_keys.len())
            .field("verify_upstream", &self.verify_upstream)
            .field("max_skew", &self.max_skew)
            .field("on_failure", &self.on_failure)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// `None` = never ping the client.
    pub interval: Option<Duration>,
    pub max_missed: u32,
    pub upstream_interval: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

/// The limits a route may set (the process-wide ones live on [`Policy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_message_size: usize,
    pub max_frame_size: usize,
    pub per_ip_handshakes: Option<Rate>,
    pub per_ip_connections: Option<u32>,
    pub per_connection_messages: Option<Rate>,
    pub per_connection_bytes: Option<Rate>,
    pub on_message_limit: OnFailure,
    /// `max_session_duration`: a session is closed with 1001 "session too
    /// long" this long after it opened, plus a jitter drawn once per session
    /// (see [`Limits::session_deadline`]); None = never.
    pub max_session_duration: Option<Duration>,
}

impl Limits {
    /// When a session opened at `start` must end: `max_session_duration`
    /// plus a random jitter in `[0, d/10)`, drawn once per session, so the
    /// close falls in `[d, 1.1d)`. Never before `d`: the operator's value is
    /// the shortest a session lives, and the jitter only spreads the
    /// reconnects of sessions opened together (after a deploy or a
    /// scale-out) over a tenth of `d` instead of one instant.
    pub fn session_deadline(&self, start: tokio::time::Instant) -> Option<tokio::time::Instant> {
        use rand::Rng;
        let d = self.max_session_duration?;
        let spread = d / 10;
        let jitter = if spread.is_zero() {
            Duration::ZERO
        } else {
            rand::rng().random_range(Duration::ZERO..spread)
        };
        Some(start + d + jitter)
    }
}

/// Collects problems while walking the raw config.
struct Check {
    problems: Vec<Problem>,
    /// `limits.shared` is set (a shared circuit breaker needs it).
    shared_redis: bool,
}

fn at(loc: Location) -> (u64, u64) {
    if loc == Location::UNKNOWN {
        (1, 1)
    } else {
        (loc.line(), loc.column())
    }
}

impl Check {
    fn push(&mut self, loc: Location, path: &str, message: impl Into<String>) {
        let (line, col) = at(loc);
        self.problems.push(Problem {
            line,
            col,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, v: &Option<Str>, path: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(&s.value) {
                Ok(d) => d,
                Err(e) => {
                    self.push(s.referenced, path, e);
                    default
                }
            },
        }
    }

    /// A duration where `0s` means "off".
    fn timer(&mut self, v: &Option<Str>, path: &str, default: Duration) -> Option<Duration> {
        Some(self.duration(v, path, default)).filter(|d| !d.is_zero())
    }

    fn size(&mut self, v: &Option<Spanned<SizeValue>>, path: &str, default: u64) -> u64 {
        match v {
            None => default,
            Some(s) => match parse_size(&s.value) {
                Ok(n) => n,
                Err(e) => {
                    self.push(s.referenced, path, e);
                    default
                }
            },
        }
    }

    fn addr(&mut self, v: &Option<Str>, path: &str, default: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 0));
        match v {
            None => default.parse().unwrap_or(fallback),
            Some(s) => match s.value.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.push(
                        s.referenced,
                        path,
                        format!("`{}` is not an IP:port address", s.value),
                    );
                    fallback
                }
            },
        }
    }

    fn rate(&mut self, r: &config::RateConfig, path: &str, bytes: bool) -> Option<Rate> {
        let parsed = match parse_rate(&r.rate.value, bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                self.push(r.rate.referenced, &format!("{path}.rate"), e);
                None
            }
        };
        let burst = match &r.burst {
            None => parsed.map(|(count, _)| u64::from(count.get())),
            Some(b) => match parse_size(&b.value) {
                Ok(0) => {
                    self.push(
                        b.referenced,
                        &format!("{path}.burst"),
                        "burst must be at least 1",
                    );
                    None
                }
                Ok(n) => Some(n),
                Err(e) => {
                    self.push(b.referenced, &format!("{path}.burst"), e);
                    None
                }
            },
        };
        let (count, per) = parsed?;
        let burst = burst?;
        let Some(burst) = u32::try_from(burst).ok().and_then(NonZeroU32::new) else {
            let loc = r.burst.as_ref().map_or(r.rate.referenced, |b| b.referenced);
            self.push(
                loc,
                &format!("{path}.burst"),
                "burst must be 1..=4294967295",
            );
            return None;
        };
        let rate = Rate { count, per, burst };
        // The limiter keeps the time a full bucket represents in u64
        // nanoseconds; refuse what would overflow it (about 292 years).
        if rate
            .period()
            .as_nanos()
            .saturating_mul(u128::from(burst.get()))
            >= u128::from(u64::MAX / 2)
        {
            let loc = r.burst.as_ref().map_or(r.rate.referenced, |b| b.referenced);
            self.push(
                loc,
                &format!("{path}.burst"),
                "burst × period is too long (refill time over a century)",
            );
            return None;
        }
        Some(rate)
    }
}

pub fn parse_size(v: &SizeValue) -> Result<u64, String> {
    match v {
        SizeValue::Bytes(n) => Ok(*n),
        SizeValue::Text(s) => size_text(s),
    }
}

/// Parses `ws[s]://host[:port][/path]` into (host, port, base path, tls).
fn parse_upstream_url(s: &str) -> Result<(String, u16, String, bool), String> {
    let (rest, tls) = if let Some(r) = s.strip_prefix("ws://") {
        (r, false)
    } else if let Some(r) = s.strip_prefix("wss://") {
        (r, true)
    } else {
        return Err(format!("`{s}` must start with ws:// or wss://"));
    };
    let default_port = if tls { 443 } else { 80 };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if path.contains(['?', '#']) {
        return Err("the upstream URL must not carry a query or fragment".into());
    }
    if authority.contains('@') {
        return Err("the upstream URL must not carry credentials".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated IPv6 address")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("`{s}` is not a valid URL")),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    if port == 0 {
        return Err("the upstream port must not be 0".into());
    }
    if !host.starts_with('[') && host.contains(':') {
        return Err(format!("`{s}`: an IPv6 host must be in brackets"));
    }
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{s}` has no valid host"));
    }
    Ok((host, port, path.trim_end_matches('/').to_string(), tls))
}

fn mode_of(m: &Option<Spanned<Mode>>) -> (Mode, Location) {
    m.as_ref()
        .map_or((Mode::Off, Location::UNKNOWN), |m| (m.value, m.referenced))
}

/// Reads an HMAC secret (base64) from the environment or a file.
fn hmac_key(c: &mut Check, k: &config::HmacKeyConfig, path: &str) -> Option<sign::Key> {
    let text = hmac_secret_text(c, k, path)?;
    match sign::Key::from_base64(&k.id.value, &text) {
        Ok(key) => Some(key),
        Err(e) => {
            c.push(k.id.referenced, path, e);
            None
        }
    }
}

/// A client key: fixed, or (`derive: CLAIM`) derived per session.
fn client_key(c: &mut Check, k: &config::HmacKeyConfig, path: &str) -> Option<sign::ClientKey> {
    let Some(claim) = &k.derive else {
        return hmac_key(c, k, path).map(sign::ClientKey::Fixed);
    };
    let text = hmac_secret_text(c, k, path)?;
    let made = sign::decode_secret(&k.id.value, &text)
        .and_then(|secret| sign::DerivingKey::new(&k.id.value, &secret, &claim.value));
    match made {
        Ok(d) => Some(sign::ClientKey::Derived(d)),
        Err(e) => {
            c.push(k.id.referenced, path, e);
            None
        }
    }
}

fn hmac_secret_text(c: &mut Check, k: &config::HmacKeyConfig, path: &str) -> Option<String> {
    let text = match (&k.secret_env, &k.secret_file) {
        (Some(env), None) => match std::env::var(&env.value) {
            Ok(v) => v,
            Err(_) => {
                c.push(
                    env.referenced,
                    &format!("{path}.secret_env"),
                    format!("environment variable `{}` is not set", env.value),
                );
                return None;
            }
        },
        (None, Some(file)) => match crate::files::read_text(std::path::Path::new(&file.value)) {
            Ok(v) => v,
            Err(e) => {
                c.push(
                    file.referenced,
                    &format!("{path}.secret_file"),
                    format!("cannot read `{}`: {e}", file.value),
                );
                return None;
            }
        },
        _ => {
            c.push(
                k.id.referenced,
                path,
                "exactly one of secret_env or secret_file is required",
            );
            return None;
        }
    };
    Some(text)
}

impl TryFrom<&Config> for Policy {
    type Error = Vec<Problem>;

    fn try_from(cfg: &Config) -> Result<Policy, Vec<Problem>> {
        let mut c = Check {
            problems: Vec::new(),
            shared_redis: cfg.limits.as_ref().is_some_and(|l| l.shared.is_some()),
        };
        let listen = c.addr(&cfg.listen, "listen", "0.0.0.0:8080");
        let tls = cfg.tls.as_ref().and_then(|t| server_tls(&mut c, t));
        let admin = cfg.admin.as_ref();
        let admin_listen = c.addr(
            &admin.and_then(|a| a.listen.clone()),
            "admin.listen",
            "127.0.0.1:9090",
        );
        let shutdown_grace = c.duration(
            &cfg.shutdown_grace,
            "shutdown_grace",
            Duration::from_secs(10),
        );
        let shutdown_delay = c.duration(&cfg.shutdown_delay, "shutdown_delay", Duration::ZERO);
        let shutdown_close_code = match &cfg.shutdown_close_code {
            None => 1001,
            Some(v) if matches!(v.value, 1001 | 1012) => u16::try_from(v.value).unwrap_or(1001),
            Some(v) => {
                c.push(
                    v.referenced,
                    "shutdown_close_code",
                    "must be 1001 (Going Away) or 1012 (Service Restart)",
                );
                1001
            }
        };

        let log = cfg.log.as_ref();
        let log_format = log.and_then(|l| l.format).unwrap_or_default();
        let log_level = match log.and_then(|l| l.level.as_ref()) {
            None => "info".to_string(),
            Some(l) => {
                let v = l.value.to_ascii_lowercase();
                if !["trace", "debug", "info", "warn", "error"].contains(&v.as_str()) {
                    c.push(
                        l.referenced,
                        "log.level",
                        "must be one of trace, debug, info, warn, error",
                    );
                }
                v
            }
        };

        let compression = compression(&mut c, cfg.compression.as_ref());
        let global = global_limits(&mut c, cfg.limits.as_ref(), "limits");
        let default_route = Route {
            prefix: String::new(),
            upstream: upstream(&mut c, cfg.upstream.as_ref(), "upstream"),
            origin: origin(&mut c, cfg.origin.as_ref(), "origin"),
            jwt: jwt(&mut c, cfg.jwt.as_ref(), "jwt"),
            introspection: introspection(&mut c, cfg.introspection.as_ref(), "introspection"),
            hmac: hmac(&mut c, cfg.hmac.as_ref(), "hmac"),
            keepalive: keepalive(&mut c, cfg.keepalive.as_ref(), "keepalive"),
            limits: limits(&mut c, cfg.limits.as_ref(), "limits"),
        };
        check_bind(&mut c, cfg.hmac.as_ref(), &default_route, "hmac");
        check_one_token_guard(
            &mut c,
            cfg.introspection.as_ref(),
            &default_route,
            "introspection",
        );

        let mut routes: Vec<Route> = Vec::new();
        for (i, r) in cfg.routes.iter().flat_map(|r| r.value.iter()).enumerate() {
            let path = format!("routes[{i}]");
            let prefix = r.path.value.clone();
            if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
                c.push(
                    r.path.referenced,
                    &format!("{path}.path"),
                    "must be a path starting with `/` (no query)",
                );
            } else if routes.iter().any(|x| x.prefix == prefix) {
                c.push(
                    r.path.referenced,
                    &format!("{path}.path"),
                    "duplicate route path",
                );
            } else {
                // Requests are matched on their normalised path without
                // `;` parameters: a prefix in any other form never matches.
                let normal = crate::handshake::normalize_path(&prefix)
                    .map(|n| crate::handshake::without_params(&n));
                match normal {
                    Ok(n) if n == prefix => {}
                    Ok(n) => c.push(
                        r.path.referenced,
                        &format!("{path}.path"),
                        format!("requests are matched on their normalised path, so this never matches: write `{n}`"),
                    ),
                    Err(e) => c.push(r.path.referenced, &format!("{path}.path"), e.to_string()),
                }
            }
            if let Some(l) = &r.limits {
                route_only_limits(&mut c, l, &format!("{path}.limits"));
            }
            let route = Route {
                prefix,
                upstream: match &r.upstream {
                    Some(u) => upstream(&mut c, Some(u), &format!("{path}.upstream")),
                    None => default_route.upstream.clone(),
                },
                origin: match &r.origin {
                    Some(o) => origin(&mut c, Some(o), &format!("{path}.origin")),
                    None => default_route.origin.clone(),
                },
                jwt: match &r.jwt {
                    Some(j) => jwt(&mut c, Some(j), &format!("{path}.jwt")),
                    None => default_route.jwt.clone(),
                },
                introspection: match &r.introspection {
                    Some(i) => introspection(&mut c, Some(i), &format!("{path}.introspection")),
                    None => default_route.introspection.clone(),
                },
                hmac: match &r.hmac {
                    Some(h) => hmac(&mut c, Some(h), &format!("{path}.hmac")),
                    None => default_route.hmac.clone(),
                },
                keepalive: match &r.keepalive {
                    Some(k) => keepalive(&mut c, Some(k), &format!("{path}.keepalive")),
                    None => default_route.keepalive,
                },
                limits: match &r.limits {
                    Some(l) => limits(&mut c, Some(l), &format!("{path}.limits")),
                    None => default_route.limits.clone(),
                },
            };
            check_bind(
                &mut c,
                r.hmac.as_ref().or(cfg.hmac.as_ref()),
                &route,
                &format!("{path}.hmac"),
            );
            check_one_token_guard(
                &mut c,
                r.introspection.as_ref().or(cfg.introspection.as_ref()),
                &route,
                &format!("{path}.introspection"),
            );
            routes.push(route);
        }
        // Longest prefix first, so the first match wins.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

        c.problems.sort_by_key(|p| (p.line, p.col));
        if c.problems.is_empty() {
            Ok(Policy {
                listen,
                admin_listen,
                shutdown_grace,
                shutdown_delay,
                shutdown_close_code,
                tls,
                log_format,
                log_level,
                max_connections: global.max_connections,
                max_pending_handshakes: global.max_pending_handshakes,
                per_ip_pending_handshakes: global.per_ip_pending_handshakes,
                handshake_timeout: global.handshake_timeout,
                trusted_proxies: global.trusted_proxies,
                per_subject_connections: global.per_subject_connections,
                per_subject_messages: global.per_subject_messages,
                shared: global.shared,
                compression,
                default_route,
                routes,
            })
        } else {
            Err(c.problems)
        }
    }
}

fn upstream(c: &mut Check, u: Option<&config::UpstreamConfig>, path: &str) -> Upstream {
    let default_url = "ws://127.0.0.1:8081";
    let (url, loc) = match u.and_then(|u| u.url.as_ref()) {
        Some(s) => (s.value.clone(), s.referenced),
        None => (default_url.to_string(), Location::UNKNOWN),
    };
    let (host, port, base_path, is_tls) = match parse_upstream_url(&url) {
        Ok(v) => v,
        Err(e) => {
            c.push(loc, &format!("{path}.url"), e);
            (String::new(), 0, String::new(), false)
        }
    };
    let connect_timeout = c.duration(
        &u.and_then(|u| u.connect_timeout.clone()),
        &format!("{path}.connect_timeout"),
        Duration::from_secs(2),
    );
    if connect_timeout.is_zero() {
        c.push(
            loc,
            &format!("{path}.connect_timeout"),
            "must be above zero",
        );
    }
    let tls_cfg = u.and_then(|u| u.tls.as_ref());
    let ca_file = tls_cfg.and_then(|t| t.value.ca_file.as_ref());
    let sni = tls_cfg.and_then(|t| t.value.server_name.as_ref());
    let tls = if is_tls {
        let client = crate::tls::client_config(ca_file.map(|f| std::path::Path::new(&f.value)));
        let name = crate::tls::server_name(&host, sni.map(|s| s.value.as_str()));
        match (client, name) {
            (Ok(client), Ok(server_name)) => Some(UpstreamTls {
                client,
                server_name,
            }),
            (Err(e), _) => {
                let l = ca_file.map_or(loc, |f| f.referenced);
                c.push(l, &format!("{path}.tls.ca_file"), e.to_string());
                None
            }
            (_, Err(e)) => {
                let l = sni.map_or(loc, |s| s.referenced);
                c.push(l, &format!("{path}.tls.server_name"), e.to_string());
                None
            }
        }
    } else {
        if let Some(t) = ca_file.or(sni) {
            c.push(
                t.referenced,
                &format!("{path}.tls"),
                "only used with a wss:// url",
            );
        }
        None
    };
    let default_breaker = config::BreakerConfig::default();
    let breaker = match u.map_or(&Tri::Missing, |u| &u.circuit_breaker) {
        Tri::Null => None,
        Tri::Missing => Some(breaker(c, &default_breaker, path)),
        Tri::Set(b) => Some(breaker(c, b, path)),
    };
    Upstream {
        url,
        host,
        port,
        base_path,
        connect_timeout,
        breaker,
        tls,
    }
}

fn server_tls(c: &mut Check, t: &Spanned<config::TlsConfig>) -> Option<TlsPolicy> {
    let (Some(cert), Some(key)) = (&t.value.cert_file, &t.value.key_file) else {
        c.push(
            t.referenced,
            "tls",
            "cert_file and key_file are both required (omit `tls` for plain ws://)",
        );
        return None;
    };
    let ca = t.value.client_ca_file.as_ref();
    let header = match &t.value.client_subject_header {
        None => None,
        Some(h) if ca.is_none() => {
            c.push(
                h.referenced,
                "tls.client_subject_header",
                "needs client_ca_file (mTLS)",
            );
            None
        }
        Some(h) => match hyper::header::HeaderName::from_bytes(h.value.as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                c.push(
                    h.referenced,
                    "tls.client_subject_header",
                    "not a valid header name",
                );
                None
            }
        },
    };
    match crate::tls::server_config(
        std::path::Path::new(&cert.value),
        std::path::Path::new(&key.value),
        ca.map(|f| std::path::Path::new(&f.value)),
    ) {
        Ok(server) => Some(TlsPolicy {
            server,
            mtls: ca.is_some(),
            client_subject_header: header,
        }),
        Err(e) => {
            c.push(cert.referenced, "tls", e.to_string());
            None
        }
    }
}

fn breaker(c: &mut Check, b: &config::BreakerConfig, up: &str) -> BreakerPolicy {
    let path = format!("{up}.circuit_breaker");
    let consecutive_failures = b.consecutive_failures.as_ref().map_or(5, |v| v.value);
    if let Some(v) = b.consecutive_failures.as_ref().filter(|v| v.value == 0) {
        c.push(
            v.referenced,
            &format!("{path}.consecutive_failures"),
            "must be at least 1 (use `circuit_breaker: null` to turn it off)",
        );
    }
    let half_open_probes = b.half_open_probes.as_ref().map_or(1, |v| v.value);
    if let Some(v) = b.half_open_probes.as_ref().filter(|v| v.value == 0) {
        c.push(
            v.referenced,
            &format!("{path}.half_open_probes"),
            "must be at least 1",
        );
    }
    let open_for = c.duration(
        &b.open_for,
        &format!("{path}.open_for"),
        Duration::from_secs(30),
    );
    let max_open_for = c.duration(
        &b.max_open_for,
        &format!("{path}.max_open_for"),
        Duration::from_secs(300),
    );
    if open_for.is_zero() {
        if let Some(s) = &b.open_for {
            c.push(
                s.referenced,
                &format!("{path}.open_for"),
                "must be above zero",
            );
        }
    }
    if max_open_for < open_for {
        let loc = b
            .max_open_for
            .as_ref()
            .or(b.open_for.as_ref())
            .map_or(Location::UNKNOWN, |s| s.referenced);
        c.push(
            loc,
            &format!("{path}.max_open_for"),
            "must be at least open_for",
        );
    }
    BreakerPolicy {
        consecutive_failures,
        open_for,
        max_open_for,
        half_open_probes,
        shared: match &b.shared {
            Some(v) if v.value && !c.shared_redis => {
                c.push(
                    v.referenced,
                    &format!("{path}.shared"),
                    "needs limits.shared (the Redis the replicas share)",
                );
                false
            }
            Some(v) => v.value,
            None => false,
        },
    }
}

fn origin(c: &mut Check, o: Option<&config::OriginConfig>, path: &str) -> Option<OriginPolicy> {
    let o = o?;
    let (mode, _) = mode_of(&o.mode);
    if mode == Mode::Off {
        return None;
    }
    let allow: Vec<String> = o.allow.iter().flatten().map(|s| s.value.clone()).collect();
    match OriginPolicy::new(mode, &allow, o.allow_missing.unwrap_or(false)) {
        Ok(p) => Some(p),
        Err((i, msg)) => {
            let loc = o
                .allow
                .as_ref()
                .and_then(|a| a.get(i))
                .map_or(Location::UNKNOWN, |s| s.referenced);
            c.push(loc, &format!("{path}.allow[{i}]"), msg);
            None
        }
    }
}

fn jwt(c: &mut Check, j: Option<&config::JwtConfig>, path: &str) -> Option<Arc<Jwt>> {
    match jwt::build(j?, path) {
        Ok(v) => v.map(Arc::new),
        Err(problems) => {
            for (loc, p, msg) in problems {
                c.push(loc, &p, msg);
            }
            None
        }
    }
}

fn introspection(
    c: &mut Check,
    i: Option<&config::IntrospectionConfig>,
    path: &str,
) -> Option<Arc<crate::guard::introspect::Introspection>> {
    match crate::guard::introspect::build(i?, path) {
        Ok(v) => v.map(Arc::new),
        Err(problems) => {
            for (loc, p, msg) in problems {
                c.push(loc, &p, msg);
            }
            None
        }
    }
}

/// On a route, at most one of `jwt` and `introspection` is on.
fn check_one_token_guard(
    c: &mut Check,
    i: Option<&config::IntrospectionConfig>,
    route: &Route,
    path: &str,
) {
    if route.jwt.is_some() && route.introspection.is_some() {
        let loc = i
            .and_then(|i| i.mode.as_ref())
            .map_or(Location::UNKNOWN, |m| m.referenced);
        c.push(
            loc,
            &format!("{path}.mode"),
            "jwt and introspection are both on for this route; at most one may be (set the other's mode: off)",
        );
    }
}

/// `hmac.bind_claim` and a client key's `derive` need a token (JWT or
/// introspection) on the same route to take the claim from.
fn check_bind(c: &mut Check, h: Option<&config::HmacConfig>, route: &Route, path: &str) {
    let Some(h) = h else {
        return;
    };
    if route.hmac.is_none() || route.jwt.is_some() || route.introspection.is_some() {
        return;
    }
    let msg = "needs jwt or introspection (mode enforce or report) on the same route";
    if let Some(b) = &h.bind_claim {
        c.push(b.referenced, &format!("{path}.bind_claim"), msg);
    }
    for (i, k) in h
        .client_keys
        .iter()
        .flat_map(|k| k.value.iter())
        .enumerate()
    {
        if let Some(d) = &k.derive {
            c.push(
                d.referenced,
                &format!("{path}.client_keys[{i}].derive"),
                msg,
            );
        }
    }
}

fn hmac(c: &mut Check, h: Option<&config::HmacConfig>, path: &str) -> Option<Hmac> {
    let h = h?;
    let (mode, mode_loc) = mode_of(&h.mode);
    if mode == Mode::Off {
        return None;
    }
    let mut client_keys = Vec::new();
    match &h.client_keys {
        Some(keys) if !keys.value.is_empty() => {
            for (i, k) in keys.value.iter().enumerate() {
                if let Some(key) = client_key(c, k, &format!("{path}.client_keys[{i}]")) {
                    if client_keys
                        .iter()
                        .any(|x: &sign::ClientKey| x.kid() == key.kid())
                    {
                        c.push(
                            k.id.referenced,
                            &format!("{path}.client_keys[{i}].id"),
                            "duplicate key id",
                        );
                    }
                    client_keys.push(key);
                }
            }
        }
        other => {
            let loc = other.as_ref().map_or(mode_loc, |k| k.referenced);
            c.push(
                loc,
                &format!("{path}.client_keys"),
                "at least one key is required when hmac.mode is not off",
            );
        }
    }
    let mut upstream_keys: Vec<sign::Key> = Vec::new();
    let mut upstream_ok = true;
    match &h.upstream_key {
        Some(k) => {
            let list = k.value.as_slice();
            if list.is_empty() {
                c.push(
                    k.referenced,
                    &format!("{path}.upstream_key"),
                    "at least one key is required when hmac.mode is not off",
                );
                upstream_ok = false;
            }
            let many = matches!(k.value, config::OneOrMany::Many(_));
            for (i, kc) in list.iter().enumerate() {
                let kpath = if many {
                    format!("{path}.upstream_key[{i}]")
                } else {
                    format!("{path}.upstream_key")
                };
                if let Some(d) = &kc.derive {
                    c.push(
                        d.referenced,
                        &format!("{kpath}.derive"),
                        "only client keys can be derived (the backend holds one key)",
                    );
                }
                match hmac_key(c, kc, &kpath) {
                    Some(key) => {
                        if upstream_keys.iter().any(|x| x.kid() == key.kid()) {
                            c.push(kc.id.referenced, &format!("{kpath}.id"), "duplicate key id");
                        }
                        upstream_keys.push(key);
                    }
                    None => upstream_ok = false,
                }
            }
        }
        None => {
            c.push(
                mode_loc,
                &format!("{path}.upstream_key"),
                "required when hmac.mode is not off",
            );
            upstream_ok = false;
        }
    };
    let max_skew = c.duration(
        &h.max_skew,
        &format!("{path}.max_skew"),
        Duration::from_secs(30),
    );
    let upstream_key = upstream_keys.first().cloned().filter(|_| upstream_ok)?;
    if client_keys.is_empty() {
        return None;
    }
    Some(Hmac {
        mode,
        client_keys: sign::fixed_keys(&client_keys),
        all_client_keys: client_keys,
        upstream_key,
        upstream_keys,
        verify_upstream: h.verify_upstream.unwrap_or(true),
        bind_claim: h.bind_claim.as_ref().map(|b| b.value.clone()),
        max_skew,
        on_failure: h.on_failure.unwrap_or_default(),
    })
}

/// Whether the session engine inflates and deflates (RFC 7692). While it
/// did not, `compression.mode: on` was refused as not supported yet and an
/// omitted `mode` meant off: negotiating an extension the relay cannot
/// honour would corrupt every compressed message.
pub const COMPRESSION_BUILT: bool = true;
/// Whether messages may share an LZ77 window (context takeover). Only the
/// no-takeover path is built: state lives for one message.
pub const CONTEXT_TAKEOVER_BUILT: bool = false;

fn compression(
    c: &mut Check,
    k: Option<&config::CompressionConfig>,
) -> Option<crate::compression::Settings> {
    let d = config::CompressionConfig::default();
    let k = k.unwrap_or(&d);
    let default_mode = if COMPRESSION_BUILT {
        config::OnOff::On
    } else {
        config::OnOff::Off
    };
    let mode = k.mode.as_ref().map_or(default_mode, |m| m.value);
    let mut settings = crate::compression::Settings::default();
    if let Some(v) = &k.max_window_bits {
        match u8::try_from(v.value) {
            Ok(bits @ 9..=15) => settings.max_window_bits = bits,
            _ => c.push(v.referenced, "compression.max_window_bits", "must be 9..15"),
        }
    }
    if let Some(v) = &k.context_takeover {
        settings.context_takeover = v.value;
        if v.value && !CONTEXT_TAKEOVER_BUILT && mode == config::OnOff::On {
            c.push(
                v.referenced,
                "compression.context_takeover",
                "true is not supported yet (only false: no context takeover)",
            );
        }
    }
    match (mode, &k.mode) {
        (config::OnOff::Off, _) => None,
        (config::OnOff::On, Some(m)) if !COMPRESSION_BUILT => {
            c.push(
                m.referenced,
                "compression.mode",
                "on is not supported yet (use off)",
            );
            None
        }
        (config::OnOff::On, _) => Some(settings),
    }
}

fn keepalive(c: &mut Check, k: Option<&config::KeepaliveConfig>, path: &str) -> Keepalive {
    let d = config::KeepaliveConfig::default();
    let k = k.unwrap_or(&d);
    let max_missed = k.max_missed.as_ref().map_or(3, |v| v.value);
    if let Some(v) = k.max_missed.as_ref().filter(|v| v.value == 0) {
        c.push(
            v.referenced,
            &format!("{path}.max_missed"),
            "must be at least 1 (use interval: 0s to stop pinging)",
        );
    }
    let interval = c.timer(
        &k.interval,
        &format!("{path}.interval"),
        Duration::from_secs(25),
    );
    let upstream_interval = c.timer(
        &k.upstream_interval,
        &format!("{path}.upstream_interval"),
        Duration::from_secs(25),
    );
    for (v, name) in [
        (&interval, "interval"),
        (&upstream_interval, "upstream_interval"),
    ] {
        if v.is_some_and(|d| d < Duration::from_millis(100)) {
            let loc = if name == "interval" {
                &k.interval
            } else {
                &k.upstream_interval
            };
            let loc = loc.as_ref().map_or(Location::UNKNOWN, |s| s.referenced);
            c.push(
                loc,
                &format!("{path}.{name}"),
                "must be 0s (off) or at least 100ms",
            );
        }
    }
    Keepalive {
        interval,
        max_missed,
        upstream_interval,
        idle_timeout: c.timer(
            &k.idle_timeout,
            &format!("{path}.idle_timeout"),
            Duration::ZERO,
        ),
    }
}

/// The process-wide limits: only valid at the top level.
fn global_limits(c: &mut Check, l: Option<&config::LimitsConfig>, path: &str) -> Global {
    let d = config::LimitsConfig::default();
    let l = l.unwrap_or(&d);
    let max_connections = l.max_connections.as_ref().map_or(10_000, |v| v.value);
    if let Some(v) = l.max_connections.as_ref().filter(|v| v.value == 0) {
        c.push(
            v.referenced,
            &format!("{path}.max_connections"),
            "must be at least 1",
        );
    }
    let handshake_timeout = c.duration(
        &l.handshake_timeout,
        &format!("{path}.handshake_timeout"),
        Duration::from_secs(10),
    );
    if handshake_timeout.is_zero() {
        let loc = l
            .handshake_timeout
            .as_ref()
            .map_or(Location::UNKNOWN, |s| s.referenced);
        c.push(
            loc,
            &format!("{path}.handshake_timeout"),
            "must be above zero",
        );
    }
    let mut trusted_proxies = Vec::new();
    for (i, s) in l.trusted_proxies.iter().flatten().enumerate() {
        match Cidr::parse(&s.value) {
            Ok(cidr) if cidr.prefix_len() == 0 => c.push(
                s.referenced,
                &format!("{path}.trusted_proxies[{i}]"),
                "trusting every address would let any client forge X-Forwarded-For; list your proxies' networks",
            ),
            Ok(cidr) => trusted_proxies.push(cidr),
            Err(e) => c.push(s.referenced, &format!("{path}.trusted_proxies[{i}]"), e),
        }
    }
    let shared = l.shared.as_ref().and_then(|sh| {
        let v = &sh.value;
        let target = redis_target(c, sh, &format!("{path}.shared"))?;
        let timeout = c.duration(
            &v.timeout,
            &format!("{path}.shared.timeout"),
            Duration::from_millis(50),
        );
        if timeout.is_zero() {
            let loc = v.timeout.as_ref().map_or(sh.referenced, |t| t.referenced);
            c.push(loc, &format!("{path}.shared.timeout"), "must be above zero");
        }
        let prefix = v
            .prefix
            .as_ref()
            .map_or_else(|| "wsguard".to_string(), |p| p.value.clone());
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            let loc = v.prefix.as_ref().map_or(sh.referenced, |p| p.referenced);
            c.push(
                loc,
                &format!("{path}.shared.prefix"),
                "must be a non-empty word",
            );
        }
        Some(crate::guard::redis_limits::SharedSettings {
            target,
            prefix,
            timeout,
            on_error: v.on_error.unwrap_or_default(),
        })
    });
    // Keyed by the JWT `sub` claim; sessions without a subject (no JWT on
    // their route) are not counted.
    let (per_subject_connections, per_subject_messages) = match &l.per_subject {
        Tri::Null => (None, None),
        Tri::Missing => (Some(20), None),
        Tri::Set(s) => (
            cap(
                c,
                &s.connections,
                20,
                &format!("{path}.per_subject.connections"),
            ),
            match &s.messages {
                Tri::Null | Tri::Missing => None,
                Tri::Set(r) => c.rate(&r.value, &format!("{path}.per_subject.messages"), false),
            },
        ),
    };
    let max_pending_handshakes = l
        .max_pending_handshakes
        .as_ref()
        .map_or(DEFAULT_MAX_PENDING_HANDSHAKES, |v| v.value);
    if let Some(v) = l.max_pending_handshakes.as_ref().filter(|v| v.value == 0) {
        c.push(
            v.referenced,
            &format!("{path}.max_pending_handshakes"),
            "must be at least 1",
        );
    }
    let per_ip_pending_handshakes = match &l.per_ip {
        Tri::Null => None,
        Tri::Missing => Some(32),
        Tri::Set(p) => cap(
            c,
            &p.pending_handshakes,
            32,
            &format!("{path}.per_ip.pending_handshakes"),
        ),
    };
    Global {
        max_connections,
        max_pending_handshakes,
        per_ip_pending_handshakes,
        handshake_timeout,
        trusted_proxies,
        per_subject_connections,
        per_subject_messages,
        shared,
    }
}

/// `limits.max_pending_handshakes` when omitted: enough for bursts of
/// legitimate upgrades, while idle pre-upgrade sockets stay far below the
/// default `max_connections` and the usual file-descriptor limits.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: u64 = 1024;
/// `limits.shared`: exactly one of `redis_url`, `sentinel`, `cluster`.
fn redis_target(
    c: &mut Check,
    sh: &Spanned<config::SharedConfig>,
    path: &str,
) -> Option<crate::guard::redis_limits::RedisTarget> {
    use crate::guard::redis_limits::{validate_target, RedisTarget};
    let v = &sh.value;
    let given = usize::from(v.redis_url.is_some())
        + usize::from(v.sentinel.is_some())
        + usize::from(v.cluster.is_some());
    if given != 1 {
        let msg = if given == 0 {
            "set one of redis_url, sentinel and cluster"
        } else {
            "set only one of redis_url, sentinel and cluster"
        };
        c.push(sh.referenced, path, msg);
        return None;
    }
    let (target, loc, key) = if let Some(url) = &v.redis_url {
        (
            RedisTarget::Url(url.value.clone()),
            url.referenced,
            "redis_url",
        )
    } else if let Some(st) = &v.sentinel {
        let sp = format!("{path}.sentinel");
        let Some(master) = &st.value.master else {
            c.push(st.referenced, &format!("{sp}.master"), "required");
            return None;
        };
        let addresses: Vec<String> = st
            .value
            .addresses
            .iter()
            .flatten()
            .map(|a| a.value.clone())
            .collect();
        let password = match &st.value.password_env {
            None => None,
            Some(env) => match std::env::var(&env.value) {
                Ok(p) => Some(p),
                Err(_) => {
                    c.push(
                        env.referenced,
                        &format!("{sp}.password_env"),
                        format!("environment variable `{}` is not set", env.value),
                    );
                    return None;
                }
            },
        };
        (
            RedisTarget::Sentinel {
                master: master.value.clone(),
                addresses,
                password,
            },
            st.referenced,
            "sentinel",
        )
    } else if let Some(nodes) = &v.cluster {
        (
            RedisTarget::Cluster(nodes.value.iter().map(|n| n.value.clone()).collect()),
            nodes.referenced,
            "cluster",
        )
    } else {
        return None;
    };
    if let Err(e) = validate_target(&target) {
        c.push(loc, &format!("{path}.{key}"), e);
        return None;
    }
    Some(target)
}

struct Global {
    max_connections: u64,
    max_pending_handshakes: u64,
    per_ip_pending_handshakes: Option<u32>,
    handshake_timeout: Duration,
    trusted_proxies: Vec<Cidr>,
    per_subject_connections: Option<u32>,
    per_subject_messages: Option<Rate>,
    shared: Option<crate::guard::redis_limits::SharedSettings>,
}

/// A route's `limits` may not set the process-wide keys.
fn route_only_limits(c: &mut Check, l: &config::LimitsConfig, path: &str) {
    let top = "only valid in the top-level limits section";
    if let Some(v) = &l.max_connections {
        c.push(v.referenced, &format!("{path}.max_connections"), top);
    }
    if let Some(v) = &l.handshake_timeout {
        c.push(v.referenced, &format!("{path}.handshake_timeout"), top);
    }
    if let Some(v) = &l.max_pending_handshakes {
        c.push(v.referenced, &format!("{path}.max_pending_handshakes"), top);
    }
    if let Tri::Set(p) = &l.per_ip {
        match &p.pending_handshakes {
            Tri::Set(v) => c.push(
                v.referenced,
                &format!("{path}.per_ip.pending_handshakes"),
                top,
            ),
            Tri::Null => c.push(
                Location::UNKNOWN,
                &format!("{path}.per_ip.pending_handshakes"),
                top,
            ),
            Tri::Missing => {}
        }
    }
    if let Some(v) = l.trusted_proxies.as_ref().and_then(|t| t.first()) {
        c.push(v.referenced, &format!("{path}.trusted_proxies"), top);
    }
    if let Some(v) = &l.shared {
        c.push(v.referenced, &format!("{path}.shared"), top);
    }
    if !matches!(l.per_subject, Tri::Missing) {
        c.push(Location::UNKNOWN, &format!("{path}.per_subject"), top);
    }
}

/// The limits a route may set.
fn limits(c: &mut Check, l: Option<&config::LimitsConfig>, path: &str) -> Limits {
    let d = config::LimitsConfig::default();
    let l = l.unwrap_or(&d);
    let max_message = c.size(
        &l.max_message_size,
        &format!("{path}.max_message_size"),
        1 << 20,
    );
    // Unset (or null): one frame may be as large as one message. Clients
    // (Python websockets, Node ws, websocat, browsers) send a message as one
    // frame, so a smaller default would cut them off below the message limit.
    let max_frame = c.size(
        &l.max_frame_size,
        &format!("{path}.max_frame_size"),
        max_message,
    );
    // 128 bytes is below any useful message; 1 GiB is above any sane one and
    // would let one client pin that much memory.
    const SANE: std::ops::RangeInclusive<u64> = 128..=(1 << 30);
    if !SANE.contains(&max_message) {
        let loc = l
            .max_message_size
            .as_ref()
            .map_or(Location::UNKNOWN, |s| s.referenced);
        c.push(
            loc,
            &format!("{path}.max_message_size"),
            "must be between 128 bytes and 1GiB",
        );
    }
    if !SANE.contains(&max_frame) {
        let loc = l
            .max_frame_size
            .as_ref()
            .map_or(Location::UNKNOWN, |s| s.referenced);
        c.push(
            loc,
            &format!("{path}.max_frame_size"),
            "must be between 128 bytes and 1GiB",
        );
    } else if max_frame > max_message {
        let loc = l
            .max_frame_size
            .as_ref()
            .or(l.max_message_size.as_ref())
            .map_or(Location::UNKNOWN, |s| s.referenced);
        c.push(
            loc,
            &format!("{path}.max_frame_size"),
            format!("must not exceed max_message_size ({max_message} bytes)"),
        );
    }

    let max_session_duration = c.timer(
        &l.max_session_duration,
        &format!("{path}.max_session_duration"),
        Duration::ZERO,
    );
    // A shorter bound would make clients reconnect in a loop: the
    // handshake (TLS, token check, upstream dial) costs more than the
    // session it buys.
    if max_session_duration.is_some_and(|d| d < Duration::from_secs(1)) {
        let loc = l
            .max_session_duration
            .as_ref()
            .map_or(Location::UNKNOWN, |s| s.referenced);
        c.push(
            loc,
            &format!("{path}.max_session_duration"),
            "must be 0s (never) or at least 1s",
        );
    }

    let default_rate = |count: u32, burst: u32| Rate {
        count: NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN),
        per: Duration::from_secs(1),
        burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
    };
    let (per_ip_handshakes, per_ip_connections) = match &l.per_ip {
        Tri::Null => (None, None),
        Tri::Missing => (Some(default_rate(5, 20)), Some(100)),
        Tri::Set(p) => {
            let hs = match &p.handshakes {
                Tri::Null => None,
                Tri::Missing => Some(default_rate(5, 20)),
                Tri::Set(r) => c.rate(r, &format!("{path}.per_ip.handshakes"), false),
            };
            let conns = cap(
                c,
                &p.connections,
                100,
                &format!("{path}.per_ip.connections"),
            );
            (hs, conns)
        }
    };
    let (per_connection_messages, per_connection_bytes) = match &l.per_connection {
        Tri::Null => (None, None),
        Tri::Missing => (Some(default_rate(50, 100)), None),
        Tri::Set(p) => {
            let m = match &p.messages {
                Tri::Null => None,
                Tri::Missing => Some(default_rate(50, 100)),
                Tri::Set(r) => c.rate(r, &format!("{path}.per_connection.messages"), false),
            };
            let b = match &p.bytes {
                Tri::Null | Tri::Missing => None,
                Tri::Set(r) => c.rate(r, &format!("{path}.per_connection.bytes"), true),
            };
            (m, b)
        }
    };
    if let (Some(b), Tri::Set(pc)) = (&per_connection_bytes, &l.per_connection) {
        if u64::from(b.burst.get()) < max_message {
            if let Tri::Set(r) = &pc.bytes {
                let loc = r.burst.as_ref().map_or(r.rate.referenced, |b| b.referenced);
                c.push(
                    loc,
                    &format!("{path}.per_connection.bytes.burst"),
                    format!("must be at least max_message_size ({max_message} bytes), or every larger message is refused"),
                );
            }
        }
    }
    Limits {
        max_message_size: usize::try_from(max_message).unwrap_or(usize::MAX),
        max_frame_size: usize::try_from(max_frame).unwrap_or(usize::MAX),
        per_ip_handshakes,
        per_ip_connections,
        per_connection_messages,
        per_connection_bytes,
        on_message_limit: l.on_message_limit.unwrap_or_default(),
        max_session_duration,
    }
}

fn cap(c: &mut Check, v: &Tri<Spanned<u32>>, default: u32, path: &str) -> Option<u32> {
    match v {
        Tri::Null => None,
        Tri::Missing => Some(default),
        Tri::Set(n) if n.value == 0 => {
            c.push(
                n.referenced,
                path,
                "must be at least 1 (use null to turn the cap off)",
            );
            None
        }
        Tri::Set(n) => Some(n.value),
    }
}

impl Policy {
    /// Parses and validates policy text; `file` is used in problem lines.
    pub fn from_text(file: &str, text: &str) -> Result<Policy, Problems> {
        // Structural problems (syntax, unknown keys, wrong types) and
        // semantic ones are reported together: the semantic checks run on
        // what remains readable once the structural problems are set aside.
        let parsed = config::parse(text);
        let mut list: Vec<Problem> = parsed
            .problems
            .into_iter()
            .map(|p| Problem {
                line: p.line,
                col: p.col,
                path: p.path,
                message: p.message,
            })
            .collect();
        if let Some(cfg) = parsed.config {
            match Policy::try_from(&cfg) {
                Ok(p) if list.is_empty() => return Ok(p),
                Ok(_) => {}
                Err(semantic) => list.extend(semantic),
            }
        }
        list.sort_by_key(|p| (p.line, p.col));
        Err(Problems {
            file: file.to_string(),
            list,
        })
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, Problems> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Problems {
            file: file.clone(),
            list: vec![Problem {
                line: 1,
                col: 1,
                path: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Policy::from_text(&file, &text)
    }

    /// The one-line summary `check` prints.
    pub fn summary(&self) -> String {
        format!(
            "ok: listen {} (admin {}), {} route(s), compression {}; default: {}",
            self.listen,
            self.admin_listen,
            self.routes.len() + 1,
            if self.compression.is_some() {
                "on"
            } else {
                "off"
            },
            self.default_route.describe(),
        )
    }

    /// `check --explain`: the effective policy of every route.
    pub fn explain(&self) -> String {
        let mut out = format!(
            "listen {}  admin {}  max_connections {}  handshake_timeout {}  trusted_proxies {}  shutdown_grace {}  shutdown_close_code {}\n",
            self.listen,
            self.admin_listen,
            self.max_connections,
            show_duration(self.handshake_timeout),
            self.trusted_proxies.len(),
            show_duration(self.shutdown_grace),
            self.shutdown_close_code,
        );
        out.push_str(&match &self.compression {
            None => "compression off\n".to_string(),
            Some(s) => format!(
                "compression on  context_takeover {}  max_window_bits {}\n",
                s.context_takeover, s.max_window_bits
            ),
        });
        for r in self
            .routes
            .iter()
            .chain(std::iter::once(&self.default_route))
        {
            let name = if r.prefix.is_empty() {
                "(top level)"
            } else {
                r.prefix.as_str()
            };
            out.push_str(&format!("route {name}: {}\n", r.describe()));
        }
        out
    }
}

/// A duration as the policy writes it: `500ms`, `25s`, `10m`, `1h`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A size as the policy writes it: `64KiB`, `1MiB`, or bytes.
pub fn show_size(n: u64) -> String {
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

/// A rate as the policy writes it: `{ rate: 5/s, burst: 20 }`.
pub fn show_rate(r: &Rate, bytes: bool) -> String {
    let unit = match r.per.as_secs() {
        1 => "s",
        60 => "m",
        3600 => "h",
        _ => "?",
    };
    let (count, burst) = if bytes {
        (
            show_size(u64::from(r.count.get())),
            show_size(u64::from(r.burst.get())),
        )
    } else {
        (r.count.to_string(), r.burst.to_string())
    };
    format!("{{ rate: {count}/{unit}, burst: {burst} }}")
}

impl Route {
    /// One line that says what is enforced on this route.
    pub fn describe(&self) -> String {
        let mode = |m: Mode| match m {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
            Mode::Off => "off",
        };
        let rate = |r: &Option<Rate>| r.map_or("off".to_string(), |r| show_rate(&r, false));
        let timer = |d: Option<Duration>| d.map_or("off".to_string(), show_duration);
        let on_limit = match self.limits.on_message_limit {
            OnFailure::Close => "close",
            OnFailure::Drop => "drop",
        };
        format!(
            "upstream {} (connect_timeout {}, breaker {}), origin {}, jwt {}, introspection {}, hmac {}, keepalive interval {} upstream_interval {} idle_timeout {} max_missed {}, \
             max_message_size {} max_frame_size {}, per_ip handshakes {} connections {}, per_connection messages {} bytes {}, on_message_limit: {}, max_session_duration {}",
            self.upstream.url,
            show_duration(self.upstream.connect_timeout),
            self.upstream.breaker.map_or("off".to_string(), |b| format!("after {} failures", b.consecutive_failures)),
            self.origin.as_ref().map_or("off", |o| mode(o.mode)),
            self.jwt.as_ref().map_or("off", |j| mode(j.mode)),
            self.introspection.as_ref().map_or("off", |i| mode(i.mode)),
            self.hmac.as_ref().map_or("off", |h| mode(h.mode)),
            timer(self.keepalive.interval),
            timer(self.keepalive.upstream_interval),
            timer(self.keepalive.idle_timeout),
            self.keepalive.max_missed,
            show_size(self.limits.max_message_size as u64),
            show_size(self.limits.max_frame_size as u64),
            rate(&self.limits.per_ip_handshakes),
            self.limits.per_ip_connections.map_or("off".to_string(), |n| n.to_string()),
            rate(&self.limits.per_connection_messages),
            self.limits.per_connection_bytes.map_or("off".to_string(), |r| show_rate(&r, true)),
            on_limit,
            timer(self.limits.max_session_duration),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match Policy::from_text("p.yaml", text) {
            Ok(_) => Vec::new(),
            Err(p) => p.list,
        }
    }

    #[test]
    fn route_paths_must_be_normalised() {
        let p = problems("routes:\n  - path: /%61dmin\n  - path: //x/./y\n  - path: /a;b\n  - path: /a%2Fb\n  - path: /ok/\n");
        let got: Vec<(&str, &str)> = p
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[0].1.contains("write `/admin`"), "{got:?}");
        assert!(got[1].1.contains("write `/x/y`"), "{got:?}");
        assert!(got[2].1.contains("write `/a`"), "{got:?}");
        assert!(got[3].1.contains("encoded slash"), "{got:?}");
    }

    #[test]
    fn pending_handshake_caps() {
        let p = Policy::from_text("p.yaml", "{}").unwrap();
        assert_eq!(p.per_ip_pending_handshakes, Some(32));
        assert_eq!(p.max_pending_handshakes, DEFAULT_MAX_PENDING_HANDSHAKES);
        let p = Policy::from_text(
            "p.yaml",
            "limits:\n  max_pending_handshakes: 7\n  per_ip:\n    pending_handshakes: 3\n",
        )
        .unwrap();
        assert_eq!(
            (p.max_pending_handshakes, p.per_ip_pending_handshakes),
            (7, Some(3))
        );
        let p = Policy::from_text("p.yaml", "limits:\n  per_ip: null\n").unwrap();
        assert_eq!(p.per_ip_pending_handshakes, None);
        let probs = problems("limits:\n  max_pending_handshakes: 0\n  per_ip:\n    pending_handshakes: 0\nroutes:\n  - path: /a\n    limits:\n      max_pending_handshakes: 5\n      per_ip: { pending_handshakes: 4 }\n");
        let paths: Vec<&str> = probs.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "limits.max_pending_handshakes",
                "limits.per_ip.pending_handshakes",
                "routes[0].limits.max_pending_handshakes",
                "routes[0].limits.per_ip.pending_handshakes"
            ]
        );
    }

    #[test]
    fn upstream_key_takes_one_key_or_a_list() {
        let dir = std::env::temp_dir().join(format!("wsguard-policy-uk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k");
        std::fs::write(&f, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let f = f.display();
        let yaml = |uk: &str| {
            format!("hmac:\n  mode: enforce\n  client_keys: [{{ id: c1, secret_file: \"{f}\" }}]\n  upstream_key: {uk}\n")
        };
        let one = Policy::from_text(
            "p.yaml",
            &yaml(&format!("{{ id: p1, secret_file: \"{f}\" }}")),
        )
        .unwrap();
        let h = one.default_route.hmac.as_ref().unwrap();
        assert_eq!(h.upstream_signing_key().kid(), "p1");
        assert_eq!(h.upstream_verify_keys().len(), 1);
        let two = Policy::from_text(
            "p.yaml",
            &yaml(&format!(
                "[{{ id: p2, secret_file: \"{f}\" }}, {{ id: p1, secret_file: \"{f}\" }}]"
            )),
        )
        .unwrap();
        let h = two.default_route.hmac.as_ref().unwrap();
        assert_eq!(h.upstream_signing_key().kid(), "p2");
        let kids: Vec<&str> = h.upstream_verify_keys().iter().map(|k| k.kid()).collect();
        assert_eq!(kids, vec!["p2", "p1"]);
        let p = problems(&yaml(&format!(
            "[{{ id: p1, secret_file: \"{f}\" }}, {{ id: p1, secret_file: \"{f}\" }}]"
        )));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "hmac.upstream_key[1].id");
        let p = problems(&yaml("[]"));
        assert_eq!(p[0].path, "hmac.upstream_key");
        let p = problems(&yaml(&format!("[{{ id: p1, secret_fil: \"{f}\" }}]")));
        assert!(
            p.iter().any(|p| p.path == "hmac.upstream_key[0].secret_fil"
                && p.message.contains("unknown field")),
            "{p:?}"
        );
    }

    #[test]
    fn shared_redis_is_one_of_url_sentinel_cluster() {
        use crate::guard::redis_limits::RedisTarget;
        let p = Policy::from_text(
            "p.yaml",
            "limits:\n  shared:\n    sentinel:\n      master: mymaster\n      addresses: [redis://10.0.0.1:26379, \"redis://:pw@10.0.0.2:26379\"]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = p.shared.unwrap_or_else(|| panic!("shared"));
        assert!(
            matches!(&s.target, RedisTarget::Sentinel { master, addresses, password: None }
                if master == "mymaster" && addresses.len() == 2),
            "{s:?}"
        );
        assert!(!format!("{s:?}").contains("pw"), "{s:?}");
        let p = Policy::from_text(
            "p.yaml",
            "limits:\n  shared:\n    cluster: [redis://10.0.0.1:6379, redis://10.0.0.2:6379]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            p.shared.map(|s| s.target),
            Some(RedisTarget::Cluster(n)) if n.len() == 2
        ));
        for (text, line, path) in [
            (
                "limits:\n  shared:\n    redis_url: redis://a\n    cluster: [redis://b]\n",
                3,
                "limits.shared",
            ),
            ("limits:\n  shared:\n    prefix: x\n", 3, "limits.shared"),
            (
                "limits:\n  shared:\n    sentinel: { addresses: [redis://a:26379] }\n",
                3,
                "limits.shared.sentinel.master",
            ),
            (
                "limits:\n  shared:\n    sentinel: { master: m, addresses: [] }\n",
                3,
                "limits.shared.sentinel",
            ),
            (
                "limits:\n  shared:\n    cluster: [http://a]\n",
                3,
                "limits.shared.cluster",
            ),
            (
                "limits:\n  shared:\n    sentinel: { master: m, addresses: [redis://a:26379], password_env: WSG_NO_SUCH_VAR }\n",
                3,
                "limits.shared.sentinel.password_env",
            ),
            (
                "upstream:\n  circuit_breaker:\n    shared: true\n",
                3,
                "upstream.circuit_breaker.shared",
            ),
        ] {
            let p = problems(text);
            assert_eq!(p.len(), 1, "{text}: {p:?}");
            assert_eq!((p[0].line, p[0].path.as_str()), (line, path), "{text}: {p:?}");
        }
        let p = Policy::from_text(
            "p.yaml",
            "upstream:\n  circuit_breaker: { shared: true }\nlimits:\n  shared: { redis_url: redis://a }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(p.default_route.upstream.breaker.is_some_and(|b| b.shared));
    }

    #[test]
    fn empty_policy_is_all_defaults() {
        let p = Policy::from_text("p.yaml", "{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.listen, "0.0.0.0:8080".parse().unwrap());
        let r = &p.default_route;
        assert_eq!(r.limits.max_message_size, 1 << 20);
        assert_eq!(r.limits.max_frame_size, 1 << 20);
        assert_eq!(r.keepalive.interval, Some(Duration::from_secs(25)));
        assert_eq!(r.upstream.breaker.map(|b| b.consecutive_failures), Some(5));
        assert_eq!(r.limits.per_ip_handshakes.map(|r| r.burst.get()), Some(20));
        assert_eq!(p.max_connections, 10_000);
    }

    #[test]
    fn unknown_key_has_line_and_path() {
        let p = problems("listen: \"127.0.0.1:1\"\nlimits:\n  max_conections: 5\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, 3);
        assert!(p[0].path.starts_with("limits"), "{p:?}");
        assert!(p[0].message.contains("max_conections"), "{p:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let p = problems(
            "shutdown_grace: 10 minutes\nkeepalive:\n  interval: 5x\nlimits:\n  per_connection:\n    messages: { rate: 0/s, burst: 1 }\n",
        );
        let paths: Vec<_> = p.iter().map(|p| (p.line, p.path.as_str())).collect();
        assert_eq!(
            paths,
            vec![
                (1, "shutdown_grace"),
                (3, "keepalive.interval"),
                (6, "limits.per_connection.messages.rate")
            ]
        );
    }

    #[test]
    fn structural_and_semantic_problems_in_one_run() {
        let p = problems(concat!(
            "listen: \"127.0.0.1:8080\"\n",
            "origin:\n",
            "  mode: enforce\n",
            "  allwo: [\"https://a.example\"]\n",
            "  allow: [\"https://a.example\"]\n",
            "keepalive:\n",
            "  interval: 5x\n",
            "  bogus: 1\n",
            "limits:\n",
            "  per_connection:\n",
            "    messages: { rate: 0/s, burst: 1 }\n",
            "  max_conections: 5\n",
        ));
        let got: Vec<_> = p.iter().map(|p| (p.line, p.col, p.path.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (4, 3, "origin.allwo"),
                (7, 13, "keepalive.interval"),
                (8, 3, "keepalive.bogus"),
                (11, 23, "limits.per_connection.messages.rate"),
                (12, 3, "limits.max_conections"),
            ]
        );
        let shown = Problems {
            file: "p.yaml".into(),
            list: p,
        }
        .to_string();
        assert_eq!(shown.lines().count(), 5);
        assert!(!shown.contains(".value"), "{shown}");
    }

    #[test]
    fn type_error_list_where_a_map_is_expected() {
        let p = problems("origin:\n  - mode: enforce\nkeepalive:\n  interval: 5x\n");
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.line, p.col, p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 3, "origin", "wrong type: expected a mapping"),
                (
                    4,
                    13,
                    "keepalive.interval",
                    "`5x` is not a duration (use e.g. 500ms, 25s, 10m, 1h)"
                ),
            ]
        );
        let p = problems("routes:\n  - path: /a\n    limits:\n      max_connections: x\n");
        assert_eq!(p[0].path, "routes[0].limits.max_connections", "{p:?}");
    }

    #[test]
    fn frame_limit_follows_the_message_limit_unless_set() {
        for text in [
            "limits:\n  max_message_size: 64KiB\n",
            "limits:\n  max_message_size: 64KiB\n  max_frame_size: null\n",
        ] {
            let p = Policy::from_text("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
            let l = &p.default_route.limits;
            assert_eq!((l.max_message_size, l.max_frame_size), (65536, 65536));
        }
        let p = Policy::from_text(
            "p.yaml",
            "limits:\n  max_message_size: 4MiB\n  max_frame_size: 64KiB\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.default_route.limits.max_frame_size, 65536);
    }

    #[test]
    fn frame_larger_than_message_is_refused() {
        let p = problems("limits:\n  max_message_size: 64KiB\n  max_frame_size: 1MiB\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].line, p[0].path.as_str()),
            (3, "limits.max_frame_size")
        );
    }

    #[test]
    fn off_values_and_bad_feature_material() {
        assert!(problems(
            "origin: { mode: off }\njwt: { mode: off }\nroutes: []\nlimits: { shared: null }\n"
        )
        .is_empty());
        let p = problems("limits:\n  shared:\n    redis_url: http://127.0.0.1:1\n");
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].line, p[0].path.as_str()),
            (3, "limits.shared.redis_url")
        );
        // Built features with bad material report the file instead.
        let p = problems("tls:\n  cert_file: /nonexistent/a\n  key_file: /nonexistent/b\n");
        assert!(p[0].message.contains("/nonexistent/a"), "{p:?}");
    }

    #[test]
    fn derived_client_keys_need_a_token_and_are_client_only() {
        let d = std::env::temp_dir().join(format!("wsguard-policy-derive-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        let k = d.join("k");
        std::fs::write(&k, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
            .unwrap_or_else(|e| panic!("{e}"));
        let k = k.display();
        let hmac = format!(
            "hmac:\n  mode: enforce\n  client_keys: [{{ id: user, secret_file: \"{k}\", derive: sub }}]\n  upstream_key: {{ id: p1, secret_file: \"{k}\" }}\n"
        );
        let p = problems(&hmac);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "hmac.client_keys[0].derive");
        let jwt =
            "jwt:\n  mode: enforce\n  algorithms: [RS256]\n  jwks_url: https://idp.example/jwks\n";
        let ok =
            Policy::from_text("p.yaml", &format!("{jwt}{hmac}")).unwrap_or_else(|e| panic!("{e}"));
        let h = ok
            .default_route
            .hmac
            .as_ref()
            .map(|h| (h.derives(), h.client_keys.len()));
        assert_eq!(h, Some((true, 0)));
        let p = problems(&format!(
            "{jwt}hmac:\n  mode: enforce\n  client_keys: [{{ id: user, secret_file: \"{k}\" }}]\n  upstream_key: {{ id: p1, secret_file: \"{k}\", derive: sub }}\n"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "hmac.upstream_key.derive");
        // In a rotation list too.
        let p = problems(&format!(
            "{jwt}hmac:\n  mode: enforce\n  client_keys: [{{ id: user, secret_file: \"{k}\" }}]\n  upstream_key: [{{ id: p2, secret_file: \"{k}\" }}, {{ id: p1, secret_file: \"{k}\", derive: sub }}]\n"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "hmac.upstream_key[1].derive");
    }

    #[test]
    fn introspection_forward_claims_are_asserted_and_validated_like_jwt() {
        let d =
            std::env::temp_dir().join(format!("wsguard-policy-intro-fc-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        let f = d.join("s");
        std::fs::write(&f, "secret").unwrap_or_else(|e| panic!("{e}"));
        let route = |target: &str| {
            format!(
                "routes:\n  - path: /intro\n    introspection: {{ mode: enforce, url: \"https://idp.example/introspect\", client_id: wsg, client_secret_file: \"{}\", forward_claims: {{ sub: {target} }} }}\n",
                f.display()
            )
        };
        // Asserted on every route, the top level (no token guard) included.
        let ok = Policy::from_text("p.yaml", &route("x-introspected-sub"))
            .unwrap_or_else(|e| panic!("{e}"));
        let asserted = ok.asserted_headers();
        let names: Vec<&str> = asserted.iter().map(|h| h.as_str()).collect();
        assert_eq!(names, vec!["x-introspected-sub"]);
        // The names jwt.forward_claims refuses are refused here too.
        for bad in [
            "x-forwarded-for",
            "x-request-id",
            "host",
            "sec-websocket-protocol",
            "x_sub",
        ] {
            let p = problems(&route(bad));
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert_eq!(
                p[0].path, "routes[0].introspection.forward_claims.sub",
                "{bad}"
            );
            assert!(p[0].message.contains("cannot carry a claim"), "{p:?}");
        }
    }

    #[test]
    fn at_most_one_token_guard_per_route() {
        let d = std::env::temp_dir().join(format!("wsguard-policy-intro-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        let f = d.join("s");
        std::fs::write(&f, "secret").unwrap_or_else(|e| panic!("{e}"));
        let intro = format!(
            "introspection: {{ mode: enforce, url: \"https://idp.example/introspect\", client_id: wsg, client_secret_file: \"{}\" }}\n",
            f.display()
        );
        let jwt =
            "jwt:\n  mode: enforce\n  algorithms: [RS256]\n  jwks_url: https://idp.example/jwks\n";
        let ok = Policy::from_text("p.yaml", &intro).unwrap_or_else(|e| panic!("{e}"));
        assert!(ok.default_route.introspection.is_some());
        let p = problems(&format!("{jwt}{intro}"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "introspection.mode");
        assert!(p[0].message.contains("at most one"), "{p:?}");
        // A route inheriting jwt must turn it off to use introspection.
        let route = format!("{jwt}routes:\n  - path: /opaque\n    {}", intro.trim_end());
        let p = problems(&route);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "routes[0].introspection.mode");
        let fixed = format!("{route}\n    jwt: {{ mode: off }}\n");
        let ok = Policy::from_text("p.yaml", &fixed).unwrap_or_else(|e| panic!("{e}"));
        assert!(ok.routes[0].introspection.is_some() && ok.routes[0].jwt.is_none());
    }

    #[test]
    fn routes_replace_sections_and_match_longest_prefix() {
        let p = Policy::from_text(
            "p.yaml",
            "upstream: { url: \"ws://127.0.0.1:1\" }\nkeepalive: { interval: 5s }\nroutes:\n  - path: /admin\n    upstream: { url: \"ws://127.0.0.1:2/adm\" }\n  - path: /admin/deep\n    keepalive: { interval: 0s }\n    limits: { max_message_size: 1KiB, max_frame_size: 1KiB }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.route(p.route_index("/other")).prefix, "");
        assert_eq!(p.route(p.route_index("/administrator")).prefix, "");
        let admin = p.route(p.route_index("/admin/x"));
        assert_eq!((admin.prefix.as_str(), admin.upstream.port), ("/admin", 2));
        assert_eq!(admin.keepalive.interval, Some(Duration::from_secs(5)));
        let deep = p.route(p.route_index("/admin/deep"));
        assert_eq!(deep.prefix, "/admin/deep");
        assert_eq!(deep.keepalive.interval, None);
        // An omitted section inherits the top level, not the parent route.
        assert_eq!(deep.upstream.port, 1);
        assert_eq!(deep.limits.max_message_size, 1024);
        assert!(p.explain().contains("route /admin/deep:"));
    }

    #[test]
    fn route_problems() {
        let p = problems("routes:\n  - path: admin\n  - path: /a\n    limits: { max_connections: 5 }\n  - path: /a\n");
        let paths: Vec<_> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "routes[0].path",
                "routes[1].limits.max_connections",
                "routes[2].path"
            ]
        );
    }

    #[test]
    fn origin_policy_is_validated() {
        let p = problems(
            "origin:\n  mode: enforce\n  allow: [\"https://ok.example\", \"not an origin\"]\n",
        );
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].line, p[0].path.as_str()), (3, "origin.allow[1]"));
    }

    #[test]
    fn dangerous_values_are_refused() {
        let p = problems("limits:\n  trusted_proxies: [\"0.0.0.0/0\"]\n  per_ip:\n    handshakes: { rate: 1/h, burst: 4000000000 }\nupstream: { url: \"ws://a:b:80\" }\n");
        let paths: Vec<_> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "limits.trusted_proxies[0]",
                "limits.per_ip.handshakes.burst",
                "upstream.url"
            ]
        );
        let p = problems("limits:\n  max_message_size: 1MiB\n  per_connection:\n    bytes: { rate: 1MiB/s, burst: 64KiB }\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].path, "limits.per_connection.bytes.burst");
        assert!(problems("upstream: { url: \"ws://127.0.0.1:0\" }\n").len() == 1);
    }

    #[test]
    fn the_summary_speaks_policy_syntax() {
        let p = Policy::from_text(
            "p.yaml",
            "keepalive: { interval: 500ms, idle_timeout: 10m }\nlimits:\n  max_message_size: 64KiB\n  on_message_limit: drop\n  per_connection:\n    messages: { rate: 600/m, burst: 50 }\n    bytes: { rate: 1MiB/s, burst: 2MiB }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = p.summary();
        for part in [
            "connect_timeout 2s",
            "interval 500ms",
            "idle_timeout 10m",
            "max_message_size 64KiB max_frame_size 64KiB",
            "handshakes { rate: 5/s, burst: 20 }",
            "messages { rate: 600/m, burst: 50 }",
            "bytes { rate: 1MiB/s, burst: 2MiB }",
            "on_message_limit: drop",
            "compression on;",
        ] {
            assert!(s.contains(part), "{part} not in {s}");
        }
        assert!(!s.contains("Drop") && !s.contains("1s burst"), "{s}");
        let off = Policy::from_text("p.yaml", "compression: { mode: off }\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            off.summary().contains("compression off;"),
            "{}",
            off.summary()
        );
        assert!(
            p.explain().contains("shutdown_grace 10s"),
            "{}",
            p.explain()
        );
    }

    #[test]
    fn upstream_urls() {
        assert_eq!(
            parse_upstream_url("ws://127.0.0.1:9000/base/"),
            Ok(("127.0.0.1".into(), 9000, "/base".into(), false))
        );
        assert!(parse_upstream_url("http://x").is_err());
    }

    #[test]
    fn max_session_duration_is_off_by_default_per_route_and_checked() {
        let p = Policy::from_text(
            "p.yaml",
            "limits:\n  max_session_duration: 1h\nroutes:\n  - path: /short\n    limits: { max_session_duration: 10m }\n  - path: /other\n    limits: { max_message_size: 64KiB }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.default_route.limits.max_session_duration,
            Some(Duration::from_secs(3600))
        );
        let at = |path: &str| p.route(p.route_index(path)).limits.max_session_duration;
        assert_eq!(at("/short"), Some(Duration::from_secs(600)));
        // A route's limits section replaces the top-level one as a whole.
        assert_eq!(at("/other"), None);
        assert!(
            p.summary().contains("max_session_duration 1h"),
            "{}",
            p.summary()
        );
        let d = Policy::from_text("p.yaml", "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.default_route.limits.max_session_duration, None);
        assert_eq!(
            d.default_route
                .limits
                .session_deadline(tokio::time::Instant::now()),
            None
        );
        assert!(problems("limits: { max_session_duration: 0s }\n").is_empty());

        let p = problems("limits:\n  max_session_duration: 500ms\nroutes:\n  - path: /a\n    limits:\n      max_session_duration: forever\n");
        let got: Vec<(u64, &str, &str)> = p
            .iter()
            .map(|p| (p.line, p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, 2);
        assert_eq!(got[0].1, "limits.max_session_duration");
        assert!(got[0].2.contains("at least 1s"), "{got:?}");
        assert_eq!(got[1].0, 6);
        assert_eq!(got[1].1, "routes[0].limits.max_session_duration");
    }

    #[test]
    fn session_deadlines_fall_in_d_to_1_1d_and_differ() {
        let p = Policy::from_text("p.yaml", "limits: { max_session_duration: 100s }\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let start = tokio::time::Instant::now();
        let d = Duration::from_secs(100);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let at = p
                .default_route
                .limits
                .session_deadline(start)
                .unwrap_or(start);
            let after = at - start;
            assert!(after >= d && after < d + d / 10, "{after:?}");
            seen.insert(after);
        }
        // Drawn per session: a fleet's sessions do not all end at once.
        assert!(seen.len() > 900, "{}", seen.len());
    }

    #[test]
    fn compression_keys_are_checked_at_their_line() {
        let p =
            problems("compression:\n  mode: on\n  context_takeover: true\n  max_window_bits: 8\n");
        let got: Vec<(u64, &str)> = p.iter().map(|p| (p.line, p.path.as_str())).collect();
        let mut want = vec![(4, "compression.max_window_bits")];
        if !CONTEXT_TAKEOVER_BUILT {
            want.insert(0, (3, "compression.context_takeover"));
        }
        if !COMPRESSION_BUILT {
            want.insert(0, (2, "compression.mode"));
        }
        assert_eq!(got, want, "{p:?}");
        assert!(problems("compression:\n  mode: maybe\n")
            .iter()
            .any(|p| p.line == 2));
        assert!(!problems("compression:\n  mode: on\n  max_window_bits: 16\n").is_empty());
    }

    #[test]
    fn compression_off_is_always_accepted() {
        for text in [
            "compression:\n  mode: off\n",
            "compression:\n  mode: off\n  context_takeover: true\n  max_window_bits: 9\n",
            "compression: { mode: false }\n",
        ] {
            let p = Policy::from_text("t.yaml", text).map_err(|e| e.to_string());
            assert_eq!(p.map(|p| p.compression), Ok(None), "{text}");
        }
        let omitted = Policy::from_text("t.yaml", "{}\n").map(|p| p.compression);
        let want = COMPRESSION_BUILT.then(crate::compression::Settings::default);
        assert_eq!(omitted.ok(), Some(want));
    }

    #[test]
    fn compression_on_gives_the_settings() {
        if !COMPRESSION_BUILT {
            return;
        }
        let p = Policy::from_text(
            "t.yaml",
            "compression:\n  mode: on\n  max_window_bits: 10\n",
        )
        .map(|p| p.compression)
        .map_err(|e| e.to_string());
        assert_eq!(
            p,
            Ok(Some(crate::compression::Settings {
                context_takeover: false,
                max_window_bits: 10
            }))
        );
    }

    #[test]
    fn shutdown_close_code_is_1001_or_1012() {
        let code = |text: &str| {
            Policy::from_text("p.yaml", text)
                .map(|p| p.shutdown_close_code)
                .map_err(|e| e.list)
        };
        assert_eq!(code(""), Ok(1001));
        assert_eq!(code("shutdown_close_code: 1001\n"), Ok(1001));
        assert_eq!(code("shutdown_close_code: 1012\n"), Ok(1012));
        for bad in ["1000", "1013", "70000", "-1", "restart"] {
            let p = code(&format!("shutdown_grace: 5s\nshutdown_close_code: {bad}\n"))
                .err()
                .unwrap_or_default();
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert_eq!(
                (p[0].line, p[0].path.as_str()),
                (2, "shutdown_close_code"),
                "{bad}"
            );
        }
        let p = Policy::from_text("p.yaml", "shutdown_close_code: 1012\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            p.explain().contains("shutdown_close_code 1012"),
            "{}",
            p.explain()
        );
    }
}
