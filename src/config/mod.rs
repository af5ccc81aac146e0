//! The policy file as written by the operator: serde structs mirroring
//! contract section 2 key for key.
//!
//! Nothing here is interpreted. Values that need parsing (durations, sizes,
//! rates, addresses) stay strings wrapped in [`Spanned`] so that the
//! validation step in [`crate::policy`] can point at the exact line and
//! column of a bad value. Every struct denies unknown keys: a typo in a
//! security policy must fail loudly instead of silently weakening it.
//!
//! Reading the text (every structural problem at its own line and column,
//! under parse budgets) is `parse`.

mod parse;
pub use parse::{parse, ParseProblem, Parsed};

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A string leaf that remembers where it was written.
pub type Str = Spanned<String>;

/// A key that distinguishes "omitted" (use the contract default) from an
/// explicit `null` (turn the feature off) — the contract gives the two
/// different meanings (`per_ip: null` means no per-IP limits).
#[derive(Debug, Clone, Default)]
pub enum Tri<T> {
    #[default]
    Missing,
    Null,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tri<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<T>::deserialize(d).map(|o| o.map_or(Tri::Null, Tri::Set))
    }
}

/// A size: an integer number of bytes or a string like `64KiB`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// `enforce | report | off` for the guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Report,
    #[default]
    Off,
}

/// `close | drop` for message-level failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Close,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Option<Str>,
    #[serde(default)]
    pub tls: Option<Spanned<TlsConfig>>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub shutdown_grace: Option<Str>,
    #[serde(default)]
    pub shutdown_delay: Option<Str>,
    /// (wsguard addition) The close code clients get on a SIGTERM drain:
    /// 1001 (the contract's default) or 1012 (Service Restart).
    #[serde(default)]
    pub shutdown_close_code: Option<Spanned<u64>>,
    #[serde(default)]
    pub log: Option<LogConfig>,
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    #[serde(default)]
    pub origin: Option<OriginConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    #[serde(default)]
    pub hmac: Option<HmacConfig>,
    #[serde(default)]
    pub keepalive: Option<KeepaliveConfig>,
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    #[serde(default)]
    pub compression: Option<CompressionConfig>,
    #[serde(default)]
    pub routes: Option<Spanned<Vec<RouteConfig>>>,
}

/// `on | off` for `compression.mode`. YAML 1.1 readers turn a bare `on`
/// into `true`; both spellings are accepted so the file means the same
/// whichever reading a tool applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOff {
    #[default]
    On,
    Off,
}

impl<'de> Deserialize<'de> for OnOff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(OnOff::On),
            Raw::Bool(false) => Ok(OnOff::Off),
            Raw::Text(t) if t == "on" => Ok(OnOff::On),
            Raw::Text(t) if t == "off" => Ok(OnOff::Off),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "unknown value `{t}`, expected `on` or `off`"
            ))),
        }
    }
}

/// `compression` (contract sections 2 and 8): permessage-deflate, negotiated
/// by wsguard with each hop separately.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default)]
    pub mode: Option<Spanned<OnOff>>,
    #[serde(default)]
    pub context_takeover: Option<Spanned<bool>>,
    #[serde(default)]
    pub max_window_bits: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Option<Str>,
    pub key_file: Option<Str>,
    #[serde(default)]
    pub client_ca_file: Option<Str>,
    /// (wsguard addition) Send the verified client certificate's subject
    /// upstream in this header (mTLS only).
    #[serde(default)]
    pub client_subject_header: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub listen: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: Option<LogFormat>,
    #[serde(default)]
    pub level: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default)]
    pub url: Option<Str>,
    #[serde(default)]
    pub connect_timeout: Option<Str>,
    #[serde(default)]
    pub tls: Option<Spanned<UpstreamTlsConfig>>,
    #[serde(default)]
    pub circuit_breaker: Tri<BreakerConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    #[serde(default)]
    pub ca_file: Option<Str>,
    #[serde(default)]
    pub server_name: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(default)]
    pub consecutive_failures: Option<Spanned<u32>>,
    #[serde(default)]
    pub open_for: Option<Str>,
    #[serde(default)]
    pub max_open_for: Option<Str>,
    #[serde(default)]
    pub half_open_probes: Option<Spanned<u32>>,
    /// Share the breaker's state through `limits.shared`'s Redis.
    #[serde(default)]
    pub shared: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    #[serde(default)]
    pub mode: Option<Spanned<Mode>>,
    #[serde(default)]
    pub allow: Option<Vec<Str>>,
    #[serde(default)]
    pub allow_missing: Option<bool>,
}

/// One JWT verification key: a PEM public-key file or an HS secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    #[serde(default)]
    pub kid: Option<Str>,
    #[serde(default)]
    pub file: Option<Str>,
    #[serde(default)]
    pub secret_env: Option<Str>,
    #[serde(default)]
    pub secret_file: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default)]
    pub mode: Option<Spanned<Mode>>,
    #[serde(default)]
    pub algorithms: Option<Vec<Str>>,
    #[serde(default)]
    pub keys: Option<Vec<JwtKeyConfig>>,
    #[serde(default)]
    pub jwks_url: Option<Str>,
    #[serde(default)]
    pub jwks_refresh: Option<Str>,
    #[serde(default)]
    pub issuer: Option<Str>,
    #[serde(default)]
    pub audience: Option<Vec<Str>>,
    #[serde(default)]
    pub leeway: Option<Str>,
    #[serde(default)]
    pub required_claims: Option<Vec<Str>>,
    #[serde(default)]
    pub token_sources: Option<Vec<Str>>,
    #[serde(default)]
    pub forward_claims: Option<std::collections::BTreeMap<String, Str>>,
    #[serde(default)]
    pub close_on_expiry: Option<bool>,
    #[serde(default)]
    pub forward_token: Option<bool>,
    /// OpenID Connect Discovery: take the JWKS from
    /// `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery: Option<Spanned<bool>>,
}

/// One item or a list of them (`hmac.upstream_key`). A map is one item, a
/// sequence a list; errors inside either keep their own precise message.
#[derive(Debug)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(t) => std::slice::from_ref(t),
            OneOrMany::Many(v) => v,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key ({ id: .., secret_env: .. }) or a list of keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(m)).map(OneOrMany::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                s: A,
            ) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(s))
                    .map(OneOrMany::Many)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// What an unreachable introspection endpoint means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IntrospectionOnError {
    /// 503 with Retry-After.
    #[default]
    Deny,
    /// Let the handshake through without claims (logged and counted).
    Allow,
}

/// `introspection`: OAuth 2.0 token introspection (RFC 7662).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    #[serde(default)]
    pub mode: Option<Spanned<Mode>>,
    #[serde(default)]
    pub url: Option<Str>,
    #[serde(default)]
    pub client_id: Option<Str>,
    #[serde(default)]
    pub client_secret_env: Option<Str>,
    /// (wsguard addition) The client secret from a file instead.
    #[serde(default)]
    pub client_secret_file: Option<Str>,
    #[serde(default)]
    pub token_sources: Option<Vec<Str>>,
    #[serde(default)]
    pub cache_ttl: Option<Str>,
    /// (wsguard addition) How long an inactive answer is reused.
    #[serde(default)]
    pub inactive_cache_ttl: Option<Str>,
    /// (wsguard addition) Most answers kept in the cache.
    #[serde(default)]
    pub cache_max_entries: Option<Spanned<u64>>,
    #[serde(default)]
    pub timeout: Option<Str>,
    #[serde(default)]
    pub on_error: Option<IntrospectionOnError>,
    #[serde(default)]
    pub forward_claims: Option<std::collections::BTreeMap<String, Str>>,
    #[serde(default)]
    pub close_on_expiry: Option<bool>,
    /// (wsguard addition) As jwt.forward_token.
    #[serde(default)]
    pub forward_token: Option<bool>,
    /// (wsguard addition) The answer's `iss` must equal this.
    #[serde(default)]
    pub issuer: Option<Str>,
    /// (wsguard addition) The answer's `aud` must contain one of these.
    #[serde(default)]
    pub audience: Option<Vec<Str>>,
    /// (wsguard addition) Clock tolerance for the answer's exp and nbf.
    #[serde(default)]
    pub leeway: Option<Str>,
}

/// An HMAC key reference: the secret is never inline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacKeyConfig {
    pub id: Str,
    #[serde(default)]
    pub secret_env: Option<Str>,
    #[serde(default)]
    pub secret_file: Option<Str>,
    /// (client keys) Derive each session's key from the secret and this
    /// token claim (contract section 3).
    #[serde(default)]
    pub derive: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacConfig {
    #[serde(default)]
    pub mode: Option<Spanned<Mode>>,
    #[serde(default)]
    pub client_keys: Option<Spanned<Vec<HmacKeyConfig>>>,
    #[serde(default)]
    pub upstream_key: Option<Spanned<OneOrMany<HmacKeyConfig>>>,
    #[serde(default)]
    pub verify_upstream: Option<bool>,
    #[serde(default)]
    pub bind_claim: Option<Str>,
    #[serde(default)]
    pub max_skew: Option<Str>,
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    #[serde(default)]
    pub interval: Option<Str>,
    #[serde(default)]
    pub max_missed: Option<Spanned<u32>>,
    #[serde(default)]
    pub upstream_interval: Option<Str>,
    #[serde(default)]
    pub idle_timeout: Option<Str>,
}

/// `{ rate: 50/s, burst: 100 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub rate: Str,
    #[serde(default)]
    pub burst: Option<Spanned<SizeValue>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerIpConfig {
    #[serde(default)]
    pub handshakes: Tri<RateConfig>,
    #[serde(default)]
    pub connections: Tri<Spanned<u32>>,
    /// Handshakes in progress at once per client IP (top level only).
    #[serde(default)]
    pub pending_handshakes: Tri<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerSubjectConfig {
    #[serde(default)]
    pub connections: Tri<Spanned<u32>>,
    #[serde(default)]
    pub messages: Tri<Spanned<RateConfig>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerConnectionConfig {
    #[serde(default)]
    pub messages: Tri<RateConfig>,
    #[serde(default)]
    pub bytes: Tri<RateConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    #[serde(default)]
    pub redis_url: Option<Str>,
    /// A Sentinel-managed primary: exactly one of `redis_url`, `sentinel`
    /// and `cluster`.
    #[serde(default)]
    pub sentinel: Option<Spanned<SentinelConfig>>,
    /// Redis Cluster: the seed nodes' URLs.
    #[serde(default)]
    pub cluster: Option<Spanned<Vec<Str>>>,
    #[serde(default)]
    pub prefix: Option<Str>,
    #[serde(default)]
    pub timeout: Option<Str>,
    #[serde(default)]
    pub on_error: Option<OnError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under.
    #[serde(default)]
    pub master: Option<Str>,
    /// The sentinels' URLs (`redis://host:26379`).
    #[serde(default)]
    pub addresses: Option<Vec<Str>>,
    /// Environment variable holding the primary's password (the sentinels'
    /// own credentials go in their URLs).
    #[serde(default)]
    pub password_env: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub max_connections: Option<Spanned<u64>>,
    #[serde(default)]
    pub max_message_size: Option<Spanned<SizeValue>>,
    #[serde(default)]
    pub max_frame_size: Option<Spanned<SizeValue>>,
    #[serde(default)]
    pub handshake_timeout: Option<Str>,
    /// (wsguard addition) Handshakes in progress at once, all clients
    /// together (top level only).
    #[serde(default)]
    pub max_pending_handshakes: Option<Spanned<u64>>,
    #[serde(default)]
    pub trusted_proxies: Option<Vec<Str>>,
    #[serde(default)]
    pub max_session_duration: Option<Str>,
    #[serde(default)]
    pub per_ip: Tri<PerIpConfig>,
    #[serde(default)]
    pub per_subject: Tri<PerSubjectConfig>,
    #[serde(default)]
    pub per_connection: Tri<PerConnectionConfig>,
    #[serde(default)]
    pub on_message_limit: Option<OnFailure>,
    #[serde(default)]
    pub shared: Option<Spanned<SharedConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub path: Str,
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    #[serde(default)]
    pub origin: Option<OriginConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    #[serde(default)]
    pub hmac: Option<HmacConfig>,
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    #[serde(default)]
    pub keepalive: Option<KeepaliveConfig>,
}
#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(u64, u64, String)> {
        parse(text)
            .problems
            .into_iter()
            .map(|p| (p.line, p.col, p.path))
            .collect()
    }

    #[test]
    fn unknown_key_points_at_the_key() {
        let p = parse("listen: \"127.0.0.1:1\"\nkeepalive:\n  interval: 5s\nbogus: 1\n");
        assert_eq!(p.problems.len(), 1);
        let e = &p.problems[0];
        assert_eq!((e.line, e.col, e.path.as_str()), (4, 1, "bogus"));
        assert!(
            e.message.starts_with("unknown field `bogus`"),
            "{}",
            e.message
        );
        // The rest is still read, for the semantic checks.
        assert!(p.config.is_some_and(|c| c.keepalive.is_some()));
    }

    #[test]
    fn every_structural_problem_at_its_own_place() {
        let t = "origin:\n  mode: enforce\n  allwo: []\nlimits:\n  per_ip:\n    handshakes: {rate: 5/s, bogus: 1, burst: 3}\n  max_connections: -1\nroutes:\n  - path: /a\n    mode: x\n";
        assert_eq!(
            problems(t),
            vec![
                (3, 3, "origin.allwo".to_string()),
                (6, 29, "limits.per_ip.handshakes.bogus".to_string()),
                (7, 20, "limits.max_connections".to_string()),
                (10, 5, "routes[0].mode".to_string()),
            ]
        );
        let p = parse(t);
        let cfg = p.config.unwrap_or_else(|| panic!("no config"));
        // The flow mapping stays readable once `bogus` is blanked.
        let burst = cfg
            .limits
            .and_then(|l| match l.per_ip {
                Tri::Set(p) => Some(p.handshakes),
                _ => None,
            })
            .and_then(|h| match h {
                Tri::Set(r) => r.burst.map(|b| b.value),
                _ => None,
            });
        assert!(matches!(burst, Some(SizeValue::Bytes(3))), "{burst:?}");
    }

    #[test]
    fn wrong_types_and_duplicates() {
        let p = parse("origin:\n  - mode: enforce\nlimits:\n  per_ip:\n    handshakes: { rate: [1], burst: 2 }\n");
        let got: Vec<_> = p
            .problems
            .iter()
            .map(|p| (p.line, p.col, p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 3, "origin", "wrong type: expected a mapping"),
                (
                    5,
                    25,
                    "limits.per_ip.handshakes.rate",
                    "wrong type: expected a string"
                ),
            ]
        );
        let p = problems("a: 1\nlimits:\n  max_connections: 5\n  max_connections: 6\n");
        assert!(
            p.contains(&(4, 3, "limits.max_connections".to_string())),
            "{p:?}"
        );
        assert!(p.contains(&(1, 1, "a".to_string())), "{p:?}");
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        for t in ["", "# nothing\n", "{}"] {
            let p = parse(t);
            assert!(p.problems.is_empty() && p.config.is_some(), "{t:?}: {p:?}");
        }
    }

    #[test]
    fn syntax_error_is_reported_alone() {
        let p = parse("bogus: 1\nlimits: [\n");
        assert!(p.config.is_none());
        assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
        assert_eq!(p.problems[0].path, "(syntax)");
        assert_eq!(p.problems[0].line, 2);
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut doc = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..20 {
            doc.push_str(&format!(
                "b{i}: &b{i} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n",
                p = if i == 0 {
                    "a".to_string()
                } else {
                    format!("b{}", i - 1)
                }
            ));
        }
        let p = parse(&doc);
        assert!(p.config.is_none() && !p.problems.is_empty());
    }
}
