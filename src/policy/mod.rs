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
//!
//! Split in three: this file holds the types and loading, `check` walks
//! the raw config into them collecting every problem, and `show` prints a
//! policy back in policy syntax (the `check` summary and `check --explain`).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::config::{self, LogFormat, Mode, OnFailure};
use crate::guard::jwt::{self, Jwt};
use crate::guard::origin::OriginPolicy;
use crate::sign;
// The value types a policy is made of live in `values`, which the guards
// import too; re-exported here because `Policy`'s fields name them.
pub use crate::values::{canonical_ip, parse_duration, parse_rate, BreakerPolicy, Cidr, Rate};
use std::sync::Arc;

mod check;
mod show;

pub use check::{
    parse_size, COMPRESSION_BUILT, CONTEXT_TAKEOVER_BUILT, DEFAULT_MAX_PENDING_HANDSHAKES,
};
pub use show::{show_duration, show_rate, show_size};

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
}

#[cfg(test)]
mod tests {
    use super::check::parse_upstream_url;
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
