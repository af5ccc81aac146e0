//! The policy file as written by the operator: serde structs mirroring
//! contract section 2 key for key.
//!
//! Nothing here is interpreted. Values that need parsing (durations, sizes,
//! rates, addresses) stay strings wrapped in [`Spanned`] so that the
//! validation step in [`crate::policy`] can point at the exact line and
//! column of a bad value. Every struct denies unknown keys: a typo in a
//! security policy must fail loudly instead of silently weakening it.

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

/// A structural problem found while reading the YAML (syntax, unknown key,
/// wrong type, duplicate key), at the line and column of the offending key
/// or value.
#[derive(Debug, Clone)]
pub struct ParseProblem {
    pub line: u64,
    pub col: u64,
    pub path: String,
    pub message: String,
}

/// Parse budget: a policy file is small; anything beyond these is hostile or
/// a mistake (a billion-laughs alias bomb, a multi-megabyte file).
fn options() -> serde_saphyr::Options {
    serde_saphyr::Options {
        budget: Some(serde_saphyr::Budget {
            max_reader_input_bytes: Some(1 << 20),
            max_events: 100_000,
            max_aliases: 100,
            max_anchors: 100,
            max_depth: 32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How many structural problems one run reports at most; past this the
/// file is not a policy with typos but something else.
const MAX_STRUCTURAL: usize = 50;

/// The outcome of reading a policy document: every structural problem, and
/// the configuration read from what remains once the offending keys and
/// values are set aside (None when the YAML itself cannot be read: a
/// syntax error, a broken budget, or more than [`MAX_STRUCTURAL`] problems).
/// Positions in the configuration are those of the original text, so the
/// semantic checks run on it point at the right places too.
#[derive(Debug)]
pub struct Parsed {
    pub config: Option<Config>,
    pub problems: Vec<ParseProblem>,
}

/// Reads a policy document and reports every structural problem.
///
/// serde stops at the first error, so this reads the document, notes the
/// error, blanks out the offending entry (an unknown or duplicate key with
/// its value) or value (a wrong type, which then reads as null) in a copy
/// of the text, keeping every other character where it was, and reads
/// again, until the rest deserialises. The error's key path is resolved
/// against the YAML node tree ([`Node`]) so that each problem is reported
/// at its own key or value with a clean path (`origin.allwo`,
/// `routes[0].mode`).
pub fn parse(text: &str) -> Parsed {
    if text.len() > 1 << 20 {
        return Parsed {
            config: None,
            problems: vec![ParseProblem {
                line: 1,
                col: 1,
                path: "(file)".into(),
                message: "policy file larger than 1 MiB".into(),
            }],
        };
    }
    // A syntax error first: nothing after it can be read reliably.
    if let Err(e) = Node::parse(text) {
        let (line, col, message) = e.unwrap_or((1, 1, "invalid YAML".into()));
        return Parsed {
            config: None,
            problems: vec![ParseProblem {
                line,
                col,
                path: "(syntax)".into(),
                message,
            }],
        };
    }
    let mut chars: Vec<char> = text.chars().collect();
    let mut current = text.to_string();
    let mut problems = Vec::new();
    // Nodes already reported (by the start of their key, or their own), and
    // those whose value was blanked for a wrong type: an error that blanking
    // causes around them ("missing field", "null") is a consequence, not a
    // new problem.
    let mut reported: Vec<usize> = Vec::new();
    let mut blanked: Vec<usize> = Vec::new();
    for _ in 0..=MAX_STRUCTURAL * 2 {
        let (err, segments) = match read(&current) {
            Ok(cfg) => {
                return Parsed {
                    config: Some(cfg),
                    problems,
                }
            }
            Err(e) => e,
        };
        let message = clean_message(&err);
        let location = err.location().map(|l| (l.line(), l.column()));
        let fatal = |problems: &mut Vec<ParseProblem>, path: String| {
            problems.push(ParseProblem {
                line: location.map_or(1, |l| l.0),
                col: location.map_or(1, |l| l.1),
                path,
                message: message.clone(),
            });
        };
        if matches!(err.without_snippet(), serde_saphyr::Error::Budget { .. }) {
            fatal(&mut problems, "(file)".into());
            return Parsed {
                config: None,
                problems,
            };
        }
        let Ok(root) = Node::parse(&current) else {
            fatal(&mut problems, "(syntax)".into());
            return Parsed {
                config: None,
                problems,
            };
        };
        let before = chars.clone();
        if let Some(dup) = message.strip_prefix("duplicate mapping key") {
            // Reported at the second occurrence; drop that one and go on.
            let _ = dup;
            match location.and_then(|l| root.entry_at(l.0, l.1)) {
                Some((path, entry)) => {
                    problems.push(ParseProblem {
                        line: entry.key.line,
                        col: entry.key.col,
                        path,
                        message: message.clone(),
                    });
                    blank(&mut chars, entry.key.start, entry.end(), true);
                }
                None => fatal(&mut problems, "(root)".into()),
            }
        } else {
            let found = root.resolve(&segments);
            let unknown = message.starts_with("unknown field");
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next());
            match found {
                Resolved {
                    path,
                    node: Some(node),
                    entry,
                    rest_is_key: false,
                } => {
                    // A value keeps its identity by its key's position: once
                    // blanked, the value itself moves.
                    let id = entry.map_or(node.start, |e| e.key.start);
                    let again = reported.contains(&id);
                    let consequence = (missing.is_some() || message.contains("null"))
                        && blanked
                            .iter()
                            .any(|b| (node.start..=node.end).contains(b) || *b == id);
                    let (line, col) = match (&entry, unknown || missing.is_some()) {
                        (Some(e), true) => (e.key.line, e.key.col),
                        _ => (node.line, node.col),
                    };
                    if !again && !consequence {
                        problems.push(ParseProblem {
                            line,
                            col,
                            path: if path.is_empty() {
                                "(root)".into()
                            } else {
                                path.clone()
                            },
                            message: message.clone(),
                        });
                        reported.push(id);
                    }
                    match (&entry, unknown || again) {
                        // An unknown key, or a value that is still wrong
                        // once blanked (a required key): drop the entry.
                        (Some(e), true) => {
                            if again {
                                blanked.push(id);
                            }
                            blank(&mut chars, e.key.start, e.end(), e.in_flow);
                        }
                        // A wrong type: blank the value, which reads as null.
                        (_, false) if node.start < node.end => {
                            blanked.push(id);
                            blank(&mut chars, node.start, node.end, false);
                        }
                        _ => {}
                    }
                }
                Resolved { path, .. } => {
                    let path = if path.is_empty() {
                        "(root)".into()
                    } else {
                        path
                    };
                    fatal(&mut problems, path);
                }
            }
        }
        if chars == before || problems.len() > MAX_STRUCTURAL {
            return Parsed {
                config: None,
                problems,
            };
        }
        current = chars.iter().collect();
    }
    Parsed {
        config: None,
        problems,
    }
}

/// One serde pass; on failure, the error and its key path.
fn read(text: &str) -> Result<Config, (serde_saphyr::Error, Vec<Seg>)> {
    // The key path of a failure is kept aside: the closure must return
    // serde-saphyr's own error so that it stops reading the document.
    let mut segments = Vec::new();
    let outcome = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
            segments = e
                .path()
                .iter()
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                    serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                    _ => None,
                })
                .collect();
            e.into_inner()
        })
    });
    outcome.map_err(|e| (e, segments))
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// One line, no snippet, no trailing position, and the Rust type names of
/// the schema turned into what an operator wrote.
fn clean_message(err: &serde_saphyr::Error) -> String {
    let shown = err.without_snippet().to_string();
    let first = shown.lines().next().unwrap_or("invalid YAML");
    let first = match first.rfind(" at line ") {
        Some(i) => first.get(..i).unwrap_or(first),
        None => first,
    };
    if let Some(what) = first.strip_prefix("unexpected event: expected ") {
        let what = what.trim_end_matches(" start").trim_end_matches(" scalar");
        let what = match what {
            "mapping" => "a mapping",
            "sequence" => "a list",
            "string" => "a string",
            other => other,
        };
        return format!("wrong type: expected {what}");
    }
    if first.contains("untagged enum SizeValue") {
        return "expected a size: a number of bytes or a string like 64KiB".into();
    }
    let mut m = first.to_string();
    if let Some(i) = m.find("expected struct ") {
        m.truncate(i);
        m.push_str("expected a mapping");
    } else if let Some(i) = m.find("expected a span-aware newtype wrapper") {
        m.truncate(i);
        m.push_str("expected a value");
    }
    m.replace("invalid type: map,", "invalid type: mapping,")
}

/// Replaces `chars[start..end]` with spaces, keeping line breaks, so that
/// every other character keeps its line and column. In a flow collection
/// the comma that separated the entry goes too.
fn blank(chars: &mut [char], start: usize, end: usize, in_flow: bool) {
    let end = end.min(chars.len());
    if start >= end {
        return;
    }
    for c in chars.iter_mut().take(end).skip(start) {
        if *c != '\n' && *c != '\r' {
            *c = ' ';
        }
    }
    if in_flow {
        // `{a: 1, bad: 2}` -> `{a: 1         }`; `{bad: 2, a: 1}` -> `{        a: 1}`.
        let after = chars.iter().skip(end).position(|c| !c.is_whitespace());
        if let Some(i) = after.map(|i| i + end) {
            if chars.get(i) == Some(&',') {
                if let Some(c) = chars.get_mut(i) {
                    *c = ' ';
                }
                return;
            }
        }
        let before = chars
            .get(..start)
            .and_then(|b| b.iter().rposition(|c| !c.is_whitespace()));
        if let Some(i) = before {
            if chars.get(i) == Some(&',') {
                if let Some(c) = chars.get_mut(i) {
                    *c = ' ';
                }
            }
        }
    }
}

/// A YAML node with its position: `start..end` in characters (as the
/// parser counts them), `line`/`col` 1-based at its start.
#[derive(Debug)]
struct Node {
    start: usize,
    end: usize,
    line: u64,
    col: u64,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Leaf,
    Map(Vec<Entry>),
    Seq(Vec<Node>),
}

#[derive(Debug)]
struct Entry {
    /// The key's text when it is a scalar.
    name: Option<String>,
    key: Node,
    value: Node,
    in_flow: bool,
}

impl Entry {
    fn end(&self) -> usize {
        self.value.end.max(self.key.end)
    }
}

/// Where a serde key path lands in the node tree.
struct Resolved<'a> {
    /// The clean key path, as the operator reads it.
    path: String,
    node: Option<&'a Node>,
    /// The mapping entry whose value is `node`.
    entry: Option<&'a Entry>,
    /// The path went on past the tree (a key that is not written).
    rest_is_key: bool,
}

/// Deepest nesting the tree builder follows (serde's budget stops at 32).
const MAX_TREE_DEPTH: usize = 64;

impl Node {
    /// The document's root node, or where and why it cannot be read
    /// (None when the tree is deeper than [`MAX_TREE_DEPTH`]).
    fn parse(text: &str) -> Result<Node, Option<(u64, u64, String)>> {
        let chars: Vec<char> = text.chars().collect();
        let mut events = saphyr_parser::Parser::new_from_str(text);
        let mut error = None;
        let root = Node::read_stream(&chars, &mut || match events.next_event() {
            Some(Ok((ev, span))) => Ok((ev, span)),
            Some(Err(e)) => {
                let m = e.marker();
                error = Some((m.line() as u64, m.col() as u64 + 1, e.info().to_string()));
                Err(())
            }
            None => Err(()),
        });
        root.map_err(|()| error)
    }

    fn read_stream<'t>(
        chars: &[char],
        next: &mut dyn FnMut() -> Result<(saphyr_parser::Event<'t>, saphyr_parser::Span), ()>,
    ) -> Result<Node, ()> {
        // StreamStart, DocumentStart, the root node.
        let root = loop {
            let Ok((ev, span)) = next() else {
                break Err(());
            };
            match ev {
                saphyr_parser::Event::StreamStart | saphyr_parser::Event::DocumentStart(_) => {}
                // An empty document: nothing more to scan.
                saphyr_parser::Event::StreamEnd => return Ok(Node::leaf(&span)),
                ev => break Node::build(ev, span, chars, next, 0),
            }
        };
        // The rest of the stream must scan too (a syntax error after the
        // first document's root, or a second document).
        root.and_then(|root| loop {
            match next() {
                Ok((saphyr_parser::Event::StreamEnd, _)) => break Ok(root),
                Ok(_) => {}
                Err(()) => break Err(()),
            }
        })
    }

    fn leaf(span: &saphyr_parser::Span) -> Node {
        Node {
            start: span.start.index(),
            end: span.end.index(),
            line: span.start.line() as u64,
            col: span.start.col() as u64 + 1,
            kind: Kind::Leaf,
        }
    }

    fn build<'t>(
        ev: saphyr_parser::Event<'t>,
        span: saphyr_parser::Span,
        text: &[char],
        next: &mut dyn FnMut() -> Result<(saphyr_parser::Event<'t>, saphyr_parser::Span), ()>,
        depth: usize,
    ) -> Result<Node, ()> {
        use saphyr_parser::Event;
        if depth > MAX_TREE_DEPTH {
            return Err(());
        }
        let mut node = Node::leaf(&span);
        match ev {
            Event::MappingStart(..) => {
                let mut entries = Vec::new();
                let flow = text.get(node.start) == Some(&'{');
                loop {
                    let (ev, span) = next()?;
                    if matches!(ev, Event::MappingEnd) {
                        if flow {
                            node.end = span.end.index();
                        }
                        break;
                    }
                    let name = match &ev {
                        Event::Scalar(v, ..) => Some(v.to_string()),
                        _ => None,
                    };
                    let key = Node::build(ev, span, text, next, depth + 1)?;
                    let (ev, span) = next()?;
                    let value = Node::build(ev, span, text, next, depth + 1)?;
                    if !flow {
                        node.end = node.end.max(value.end).max(key.end);
                    }
                    entries.push(Entry {
                        name,
                        key,
                        value,
                        in_flow: flow,
                    });
                }
                node.kind = Kind::Map(entries);
            }
            Event::SequenceStart(..) => {
                let mut items = Vec::new();
                let flow = text.get(node.start) == Some(&'[');
                loop {
                    let (ev, span) = next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        if flow {
                            node.end = span.end.index();
                        }
                        break;
                    }
                    let item = Node::build(ev, span, text, next, depth + 1)?;
                    if !flow {
                        node.end = node.end.max(item.end);
                    }
                    items.push(item);
                }
                node.kind = Kind::Seq(items);
            }
            Event::Scalar(..) | Event::Alias(..) => {}
            _ => return Err(()),
        }
        Ok(node)
    }

    /// Follows a serde path. `value` segments that name no key are the
    /// [`Spanned`] wrapper's own field and are skipped.
    fn resolve(&self, segments: &[Seg]) -> Resolved<'_> {
        let mut path = String::new();
        let mut node = self;
        let mut entry = None;
        for seg in segments {
            match (seg, &node.kind) {
                (Seg::Key(k), Kind::Map(entries)) => {
                    match entries
                        .iter()
                        .find(|e| e.name.as_deref() == Some(k.as_str()))
                    {
                        Some(e) => {
                            if !path.is_empty() {
                                path.push('.');
                            }
                            path.push_str(k);
                            node = &e.value;
                            entry = Some(e);
                        }
                        None if k == "value" => {}
                        None => {
                            if !path.is_empty() {
                                path.push('.');
                            }
                            path.push_str(k);
                            return Resolved {
                                path,
                                node: Some(node),
                                entry,
                                rest_is_key: true,
                            };
                        }
                    }
                }
                (Seg::Key(k), _) if k == "value" => {}
                (Seg::Index(i), Kind::Seq(items)) => match items.get(*i) {
                    Some(item) => {
                        path.push_str(&format!("[{i}]"));
                        node = item;
                        entry = None;
                    }
                    None => {
                        path.push_str(&format!("[{i}]"));
                        return Resolved {
                            path,
                            node: None,
                            entry: None,
                            rest_is_key: false,
                        };
                    }
                },
                (Seg::Key(k), _) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    return Resolved {
                        path,
                        node: None,
                        entry: None,
                        rest_is_key: false,
                    };
                }
                (Seg::Index(i), _) => {
                    path.push_str(&format!("[{i}]"));
                    return Resolved {
                        path,
                        node: None,
                        entry: None,
                        rest_is_key: false,
                    };
                }
            }
        }
        Resolved {
            path,
            node: Some(node),
            entry,
            rest_is_key: false,
        }
    }

    /// The mapping entry whose key starts at `line:col`, with its path.
    fn entry_at(&self, line: u64, col: u64) -> Option<(String, &Entry)> {
        match &self.kind {
            Kind::Leaf => None,
            Kind::Map(entries) => entries.iter().find_map(|e| {
                let name = e.name.clone().unwrap_or_else(|| "?".into());
                if (e.key.line, e.key.col) == (line, col) {
                    return Some((name, e));
                }
                e.value
                    .entry_at(line, col)
                    .map(|(p, x)| (format!("{name}.{p}").replace(".[", "["), x))
            }),
            Kind::Seq(items) => items.iter().enumerate().find_map(|(i, n)| {
                n.entry_at(line, col)
                    .map(|(p, x)| (format!("[{i}].{p}"), x))
            }),
        }
    }
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
