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
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use crate::config::{self, Config, LogFormat, Mode, OnFailure, SizeValue, Str, Tri};
use crate::guard::jwt::{self, Jwt};
use crate::guard::origin::OriginPolicy;
use crate::sign;
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
    pub shared: Option<crate::guard::shared::SharedSettings>,
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
    /// `forward_claims` targets of every route and the mTLS subject header
    /// (the fixed ones, `X-Forwarded-*` and friends, are in
    /// [`crate::handshake::DROP`]).
    pub fn asserted_headers(&self) -> Vec<hyper::header::HeaderName> {
        let mut out: Vec<hyper::header::HeaderName> = Vec::new();
        let claims = self
            .all_routes()
            .filter_map(|r| r.jwt.as_ref())
            .flat_map(|j| j.forward_claims.iter().map(|(_, h)| h.clone()));
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    pub open_for: Duration,
    pub max_open_for: Duration,
    pub half_open_probes: u32,
}

#[derive(Clone)]
pub struct Hmac {
    pub mode: Mode,
    /// JWT claim whose string value is bound into every signature.
    pub bind_claim: Option<String>,
    pub client_keys: Vec<sign::Key>,
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

/// A token-bucket rate: `count` cells per `per`, with a burst capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

impl Rate {
    /// The time to replenish one cell.
    pub fn period(&self) -> Duration {
        self.per / self.count.get()
    }
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
}

/// An IP network, for `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are the IPv4 address: a
/// dual-stack listener must not give one client two identities.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Collects problems while walking the raw config.
struct Check {
    problems: Vec<Problem>,
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

/// `500ms`, `25s`, `10m`, `1h` (also `0` for zero).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a duration (use e.g. 500ms, 25s, 10m, 1h)");
    if num.is_empty() || num.len() > 12 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    Ok(d)
}

fn size_text(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a size (use bytes, or e.g. 64KiB, 1MiB)");
    if num.is_empty() || num.len() > 15 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

pub fn parse_size(v: &SizeValue) -> Result<u64, String> {
    match v {
        SizeValue::Bytes(n) => Ok(*n),
        SizeValue::Text(s) => size_text(s),
    }
}

/// `50/s`, `600/m`, `10/h`, and for byte rates `1MiB/s`. A zero rate is
/// refused: it would block everything, which `null` says more honestly.
pub fn parse_rate(s: &str, bytes: bool) -> Result<(NonZeroU32, Duration), String> {
    let bad = || {
        if bytes {
            format!("`{s}` is not a byte rate (use e.g. 1MiB/s, 64KiB/s)")
        } else {
            format!("`{s}` is not a rate (use e.g. 50/s, 600/m, 10/h)")
        }
    };
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let count = if bytes {
        size_text(n)?
    } else {
        n.trim().parse::<u64>().map_err(|_| bad())?
    };
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(format!(
            "`{s}`: a rate must be above zero (use null to turn the limit off)"
        ));
    }
    let count = u32::try_from(count)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("`{s}`: rate too large"))?;
    Ok((count, per))
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
    match sign::Key::from_base64(&k.id.value, &text) {
        Ok(key) => Some(key),
        Err(e) => {
            c.push(k.id.referenced, path, e);
            None
        }
    }
}

impl TryFrom<&Config> for Policy {
    type Error = Vec<Problem>;

    fn try_from(cfg: &Config) -> Result<Policy, Vec<Problem>> {
        let mut c = Check {
            problems: Vec::new(),
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

        let global = global_limits(&mut c, cfg.limits.as_ref(), "limits");
        let default_route = Route {
            prefix: String::new(),
            upstream: upstream(&mut c, cfg.upstream.as_ref(), "upstream"),
            origin: origin(&mut c, cfg.origin.as_ref(), "origin"),
            jwt: jwt(&mut c, cfg.jwt.as_ref(), "jwt"),
            hmac: hmac(&mut c, cfg.hmac.as_ref(), "hmac"),
            keepalive: keepalive(&mut c, cfg.keepalive.as_ref(), "keepalive"),
            limits: limits(&mut c, cfg.limits.as_ref(), "limits"),
        };
        check_bind(&mut c, cfg.hmac.as_ref(), &default_route, "hmac");

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

/// `hmac.bind_claim` needs a JWT on the same route to take the claim from.
fn check_bind(c: &mut Check, h: Option<&config::HmacConfig>, route: &Route, path: &str) {
    let Some(b) = h.and_then(|h| h.bind_claim.as_ref()) else {
        return;
    };
    if route.hmac.is_some() && route.jwt.is_none() {
        c.push(
            b.referenced,
            &format!("{path}.bind_claim"),
            "needs jwt (mode enforce or report) on the same route",
        );
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
                if let Some(key) = hmac_key(c, k, &format!("{path}.client_keys[{i}]")) {
                    if client_keys.iter().any(|x: &sign::Key| x.kid() == key.kid()) {
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
        client_keys,
        upstream_key,
        upstream_keys,
        verify_upstream: h.verify_upstream.unwrap_or(true),
        bind_claim: h.bind_claim.as_ref().map(|b| b.value.clone()),
        max_skew,
        on_failure: h.on_failure.unwrap_or_default(),
    })
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
            Ok(cidr) if cidr.prefix == 0 => c.push(
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
        let Some(url) = &v.redis_url else {
            c.push(
                sh.referenced,
                &format!("{path}.shared.redis_url"),
                "required",
            );
            return None;
        };
        if let Err(e) = crate::guard::shared::validate_url(&url.value) {
            c.push(url.referenced, &format!("{path}.shared.redis_url"), e);
            return None;
        }
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
        Some(crate::guard::shared::SharedSettings {
            redis_url: url.value.clone(),
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

struct Global {
    max_connections: u64,
    max_pending_handshakes: u64,
    per_ip_pending_handshakes: Option<u32>,
    handshake_timeout: Duration,
    trusted_proxies: Vec<Cidr>,
    per_subject_connections: Option<u32>,
    per_subject_messages: Option<Rate>,
    shared: Option<crate::guard::shared::SharedSettings>,
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
    let max_frame = c.size(
        &l.max_frame_size,
        &format!("{path}.max_frame_size"),
        256 << 10,
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
        let cfg = config::parse(text).map_err(|p| Problems {
            file: file.to_string(),
            list: vec![Problem {
                line: p.line,
                col: p.col,
                path: p.path,
                message: p.message,
            }],
        })?;
        Policy::try_from(&cfg).map_err(|list| Problems {
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
            "ok: listen {} (admin {}), {} route(s); default: {}",
            self.listen,
            self.admin_listen,
            self.routes.len() + 1,
            self.default_route.describe(),
        )
    }

    /// `check --explain`: the effective policy of every route.
    pub fn explain(&self) -> String {
        let mut out = format!(
            "listen {}  admin {}  max_connections {}  handshake_timeout {:?}  trusted_proxies {}  shutdown_grace {:?}\n",
            self.listen,
            self.admin_listen,
            self.max_connections,
            self.handshake_timeout,
            self.trusted_proxies.len(),
            self.shutdown_grace,
        );
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

impl Route {
    /// One line that says what is enforced on this route.
    pub fn describe(&self) -> String {
        let mode = |m: Mode| match m {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
            Mode::Off => "off",
        };
        let rate = |r: &Option<Rate>| {
            r.map_or("off".to_string(), |r| {
                format!("{}/{:?} burst {}", r.count, r.per, r.burst)
            })
        };
        let timer = |d: Option<Duration>| d.map_or("off".to_string(), |d| format!("{d:?}"));
        format!(
            "upstream {} (connect_timeout {:?}, breaker {}), origin {}, jwt {}, hmac {}, keepalive client {} upstream {} idle {} max_missed {}, \
             max_message {} max_frame {}, per_ip handshakes {} connections {}, per_connection messages {} bytes {} on_limit {:?}",
            self.upstream.url,
            self.upstream.connect_timeout,
            self.upstream.breaker.map_or("off".to_string(), |b| format!("after {} failures", b.consecutive_failures)),
            self.origin.as_ref().map_or("off", |o| mode(o.mode)),
            self.jwt.as_ref().map_or("off", |j| mode(j.mode)),
            self.hmac.as_ref().map_or("off", |h| mode(h.mode)),
            timer(self.keepalive.interval),
            timer(self.keepalive.upstream_interval),
            timer(self.keepalive.idle_timeout),
            self.keepalive.max_missed,
            self.limits.max_message_size,
            self.limits.max_frame_size,
            rate(&self.limits.per_ip_handshakes),
            self.limits.per_ip_connections.map_or("off".to_string(), |n| n.to_string()),
            rate(&self.limits.per_connection_messages),
            rate(&self.limits.per_connection_bytes),
            self.limits.on_message_limit,
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
        assert!(p[0].message.contains("unknown field"), "{p:?}");
    }

    #[test]
    fn empty_policy_is_all_defaults() {
        let p = Policy::from_text("p.yaml", "{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.listen, "0.0.0.0:8080".parse().unwrap());
        let r = &p.default_route;
        assert_eq!(r.limits.max_message_size, 1 << 20);
        assert_eq!(r.limits.max_frame_size, 256 << 10);
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
    fn parsers() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert_eq!(size_text("64KiB"), Ok(65536));
        assert!(size_text("1MB").is_err());
        let (n, per) = parse_rate("600/m", false).unwrap();
        assert_eq!((n.get(), per), (600, Duration::from_secs(60)));
        assert_eq!(parse_rate("1MiB/s", true).map(|r| r.0.get()), Ok(1 << 20));
        assert!(parse_rate("0/s", false).is_err());
        assert!(parse_rate("5", false).is_err());
        assert_eq!(
            parse_upstream_url("ws://127.0.0.1:9000/base/"),
            Ok(("127.0.0.1".into(), 9000, "/base".into(), false))
        );
        assert!(parse_upstream_url("http://x").is_err());
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let c = Cidr::parse("fd00::/8").unwrap();
        assert!(c.contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }
}
