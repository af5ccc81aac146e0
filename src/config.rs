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
    #[serde(default)]
    pub log: Option<LogConfig>,
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    #[serde(default)]
    pub origin: Option<OriginConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub hmac: Option<HmacConfig>,
    #[serde(default)]
    pub keepalive: Option<KeepaliveConfig>,
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    #[serde(default)]
    pub routes: Option<Spanned<Vec<RouteConfig>>>,
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

/// An HMAC key reference: the secret is never inline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacKeyConfig {
    pub id: Str,
    #[serde(default)]
    pub secret_env: Option<Str>,
    #[serde(default)]
    pub secret_file: Option<Str>,
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
    #[serde(default)]
    pub prefix: Option<Str>,
    #[serde(default)]
    pub timeout: Option<Str>,
    #[serde(default)]
    pub on_error: Option<OnError>,
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
    pub hmac: Option<HmacConfig>,
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    #[serde(default)]
    pub keepalive: Option<KeepaliveConfig>,
}

/// A structural problem found while reading the YAML (syntax, unknown key,
/// wrong type). serde stops at the first one, so there is at most one.
#[derive(Debug)]
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

/// Reads a policy document. On failure, reports where and under which key
/// path the first structural problem is.
pub fn parse(text: &str) -> Result<Config, ParseProblem> {
    if text.len() > 1 << 20 {
        return Err(ParseProblem {
            line: 1,
            col: 1,
            path: "(file)".into(),
            message: "policy file larger than 1 MiB".into(),
        });
    }
    // The key path of a failure is kept aside: the closure must return
    // serde-saphyr's own error so that it stops reading the document.
    let mut path = String::new();
    let outcome = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    let err = match outcome {
        Ok(cfg) => return Ok(cfg),
        Err(e) => e,
    };
    let located = err.location().map(|l| (l.line(), l.column()));
    // The error's Display carries a source snippet; keep the first line only
    // so every problem stays one line, without the trailing position.
    let shown = err.without_snippet().to_string();
    let first = shown.lines().next().unwrap_or("invalid YAML");
    let message = match first.rfind(" at line ") {
        Some(i) => first.get(..i).unwrap_or(first),
        None => first,
    }
    .to_string();
    // serde's "unknown field" errors carry no position: find the key.
    let (line, col) = match located {
        Some(lc) if lc != (1, 1) => lc,
        _ => locate(text, &path).or(located).unwrap_or((1, 1)),
    };
    let path = if path.is_empty() || path == "." {
        "(root)".to_string()
    } else {
        path
    };
    Err(ParseProblem {
        line,
        col,
        path,
        message,
    })
}

/// Finds where a key path (`limits.per_ip.handshakes`) is written, by
/// searching for each segment after the previous one. Used only to place
/// serde errors that have no position of their own.
fn locate(text: &str, path: &str) -> Option<(u64, u64)> {
    let mut from = 0usize;
    let mut found = None;
    for seg in path.split('.') {
        let key = seg.split('[').next().unwrap_or(seg);
        if key.is_empty() || key == "?" {
            continue;
        }
        let rest = text.get(from..)?;
        let mut search = 0usize;
        let pos = loop {
            let i = rest.get(search..)?.find(key)? + search;
            let before_ok = i == 0
                || rest
                    .get(..i)
                    .and_then(|b| b.chars().next_back())
                    .is_some_and(|c| {
                        c.is_whitespace() || c == '{' || c == ',' || c == '"' || c == '\''
                    });
            let after = rest.get(i + key.len()..).unwrap_or("");
            let after = after.trim_start_matches(['"', '\'']);
            if before_ok && after.trim_start_matches(' ').starts_with(':') {
                break i;
            }
            search = i + key.len();
        };
        from += pos;
        found = Some(from);
    }
    let at = found?;
    let before = text.get(..at)?;
    let line = before.matches('\n').count() as u64 + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
    Some((line, col))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_keys() {
        let t = "limits:\n  per_ip:\n    handshakes: {rate: 5/s, bogus: 1}\n  max_conections: 5\n";
        assert_eq!(locate(t, "limits.max_conections"), Some((4, 3)));
        assert_eq!(locate(t, "limits.per_ip.handshakes.bogus"), Some((3, 29)));
        assert_eq!(locate(t, "nothing"), None);
    }

    #[test]
    fn unknown_key_points_at_the_key() {
        let e =
            parse("listen: \"127.0.0.1:1\"\nkeepalive:\n  interval: 5s\nbogus: 1\n").unwrap_err();
        assert_eq!((e.line, e.col, e.path.as_str()), (4, 1, "bogus"));
        assert!(
            e.message.starts_with("unknown field `bogus`"),
            "{}",
            e.message
        );
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
        assert!(parse(&doc).is_err());
    }
}
