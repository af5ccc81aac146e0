//! Validation: the raw [`crate::config::Config`] walked into a [`Policy`],
//! every problem collected with its line, column and key path.

use super::*;
use std::num::NonZeroU32;

use serde_saphyr::{Location, Spanned};

use crate::config::{Config, SizeValue, Str, Tri};
use crate::values::size_text;

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
pub(super) fn parse_upstream_url(s: &str) -> Result<(String, u16, String, bool), String> {
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
/// Whether messages may share an LZ77 window (context takeover): built;
/// its per-session cost is in docs/benchmarks.md.
pub const CONTEXT_TAKEOVER_BUILT: bool = true;

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
