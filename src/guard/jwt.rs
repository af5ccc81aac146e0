//! The JWT guard: policy validation ([`build`]), token extraction and
//! removal ([`extract`], [`strip_query`], [`strip_cookie`],
//! [`strip_subprotocol`], [`strip_header`]) and verification ([`Verifier`]).
//!
//! Security rules, all enforced here and covered by the tests below:
//! - the algorithm list is pinned at load; `none` can never be pinned, and a
//!   token whose `alg` is not pinned is rejected before any key is looked at;
//! - a key only verifies the algorithms of its own family (and, for EC, its
//!   curve), so an RSA public key is never used as an HMAC secret;
//! - `kid` is only a lookup key; `jku`, `x5u`, `jwk` and `x5c` headers are
//!   ignored, and a token carrying `crit` is rejected (no extension is
//!   understood);
//! - keys (PEM files, secrets) are parsed once at load; the JWKS is fetched
//!   at start, refreshed in the background, and refetched on an unknown kid
//!   at most once per [`UNKNOWN_KID_REFETCH`]; a failed fetch keeps the last
//!   good keys. Each URL's keys live in one [`JwksCache`], which the proxy
//!   keeps across reloads while the URL is still named.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, Validation};
use serde_saphyr::Location;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{JwtConfig, JwtKeyConfig, Mode, Str};
use crate::policy::parse_duration;

/// An unknown kid triggers at most one JWKS refetch per this interval
/// (one global throttle, not per kid: kids are attacker-chosen).
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// Per-request timeout of a JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on the initial fetch awaited by [`Verifier::start`].
const JWKS_START_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused.
const JWKS_MAX_BYTES: usize = 256 * 1024;
/// At most this many usable keys are taken from one JWKS document.
const JWKS_MAX_KEYS: usize = 64;
/// A token longer than this is refused without parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// A PEM key file larger than this is refused.
const MAX_PEM_BYTES: u64 = 64 * 1024;
/// RFC 7518 section 3.2: HS256 needs a key of at least 256 bits.
const MIN_HS_SECRET: usize = 32;
/// RSA keys shorter than this are refused (the verifier would refuse them
/// anyway, on every request).
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;
/// A leeway above this would make `exp` meaningless.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Every algorithm that can be pinned.
const SUPPORTED: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Installs jsonwebtoken's aws-lc-rs crypto provider as the process default.
///
/// With only the `aws_lc_rs` feature of jsonwebtoken enabled the crate
/// selects that provider by itself on first use, so this is not strictly
/// required; calling it once at process start makes the choice explicit and
/// keeps working if another dependency ever enables `rust_crypto` too (with
/// both features on and nothing installed, jsonwebtoken panics on first use).
/// Calling it more than once is harmless.
pub fn install_crypto_provider() {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

/// Where a token is taken from, in the configured order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// A query parameter of that name.
    Query(String),
    /// A cookie of that name.
    Cookie(String),
    /// A requested subprotocol starting with that prefix; the token is the rest.
    Subprotocol(String),
}

impl TokenSource {
    /// Parses `header`, `query:NAME`, `cookie:NAME` or `subprotocol:PREFIX`.
    pub fn parse(s: &str) -> Result<TokenSource, String> {
        if s == "header" {
            return Ok(TokenSource::Header);
        }
        let bad = || {
            format!(
                "`{s}` is not a token source (use header, query:NAME, cookie:NAME or subprotocol:PREFIX)"
            )
        };
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(format!("`{s}`: the name after `{kind}:` is empty"));
        }
        match kind {
            "query" => {
                if name
                    .bytes()
                    .any(|b| matches!(b, b'&' | b'=' | b'#' | b'?') || b <= b' ')
                {
                    return Err(format!("`{name}` is not a plain query parameter name"));
                }
                Ok(TokenSource::Query(name.to_string()))
            }
            "cookie" => {
                if !name.bytes().all(is_tchar) {
                    return Err(format!("`{name}` is not a valid cookie name"));
                }
                Ok(TokenSource::Cookie(name.to_string()))
            }
            "subprotocol" => {
                if !name.bytes().all(is_tchar) {
                    return Err(format!(
                        "`{name}` is not a valid subprotocol prefix (HTTP token characters only)"
                    ));
                }
                Ok(TokenSource::Subprotocol(name.to_string()))
            }
            _ => Err(bad()),
        }
    }

    /// `header`, `query`, `cookie` or `subprotocol` (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            TokenSource::Header => "header",
            TokenSource::Query(_) => "query",
            TokenSource::Cookie(_) => "cookie",
            TokenSource::Subprotocol(_) => "subprotocol",
        }
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Header => f.write_str("header"),
            TokenSource::Query(n) => write!(f, "query:{n}"),
            TokenSource::Cookie(n) => write!(f, "cookie:{n}"),
            TokenSource::Subprotocol(p) => write!(f, "subprotocol:{p}"),
        }
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One verification key, from the policy or from the JWKS.
#[derive(Clone, Debug)]
pub struct StaticKey {
    /// A key with a kid only verifies tokens carrying that kid (or no kid);
    /// a key without one is tried for any token of a matching algorithm.
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The algorithms this key may verify: its family (and, for EC, its
    /// curve; for a JWKS key, its declared `alg`), within the pinned list for
    /// a configured key, within the supported ones for a JWKS key (a token's
    /// algorithm is checked against the pinned list before any key is
    /// tried). Never empty.
    pub algorithms: Vec<Algorithm>,
}

impl StaticKey {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }
}

/// Validated, typed JWT policy (built at load; keys parsed once here, never
/// per request).
#[derive(Debug, Clone)]
pub struct Jwt {
    /// Enforce or Report (Off => no `Jwt` at all).
    pub mode: Mode,
    /// Pinned; `none` impossible.
    pub algorithms: Vec<Algorithm>,
    pub keys: Vec<StaticKey>,
    /// `https://`, or `http://` to 127.0.0.1, [::1] or localhost only.
    pub jwks_url: Option<String>,
    /// `discovery: true`: the OpenID Connect Discovery document's URL
    /// (`{issuer}/.well-known/openid-configuration`); its `jwks_uri` is used
    /// like `jwks_url`, and its `issuer` must equal `issuer` exactly.
    pub discovery_url: Option<String>,
    /// Background refresh period; zero means no periodic refresh.
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    /// Empty means `aud` is not checked.
    pub audience: Vec<String>,
    /// Whole seconds are used.
    pub leeway: Duration,
    pub required_claims: Vec<String>,
    pub token_sources: Vec<TokenSource>,
    /// Claim name -> request header sent upstream.
    pub forward_claims: Vec<(String, HeaderName)>,
    pub close_on_expiry: bool,
    pub forward_token: bool,
}

impl Jwt {
    /// The identity of this policy's JWKS cache (None without one): the
    /// `jwks_url`, or the discovery document's URL and the expected issuer.
    pub fn jwks_cache_key(&self) -> Option<String> {
        match (&self.jwks_url, &self.discovery_url, &self.issuer) {
            (Some(u), _, _) => Some(u.clone()),
            (None, Some(d), Some(iss)) => Some(format!("{d} (issuer {iss})")),
            _ => None,
        }
    }

    /// A JWKS cache for this policy, not yet fetched (None without a JWKS).
    pub fn new_jwks_cache(&self) -> Option<Arc<JwksCache>> {
        match (&self.jwks_url, &self.discovery_url, &self.issuer) {
            (Some(u), _, _) => Some(JwksCache::new(u)),
            (None, Some(d), Some(iss)) => Some(JwksCache::discovery(d, iss)),
            _ => None,
        }
    }

    /// When a live session authenticated by `claims` must be closed: `exp`
    /// plus the leeway (the same bound the handshake accepted). None when the
    /// token has no numeric `exp`.
    pub fn session_deadline(&self, claims: &Claims) -> Option<SystemTime> {
        let exp = exp_of(claims)?;
        UNIX_EPOCH.checked_add(Duration::from_secs(
            exp.saturating_add(self.leeway.as_secs()),
        ))
    }
}

/// One validation problem: location, full key path (starting with the
/// `path` given to [`build`]) and message.
pub type Problem = (Location, String, String);

/// Validates a `jwt` section. `path` is the key path of the section (`jwt`,
/// `routes[0].jwt`); every problem's path starts with it. Returns
/// `Ok(None)` for `mode: off` (or no mode), without looking at anything else.
pub fn build(cfg: &JwtConfig, path: &str) -> Result<Option<Jwt>, Vec<Problem>> {
    let (mode, mode_loc) = match &cfg.mode {
        Some(m) => (m.value, m.referenced),
        None => (Mode::Off, Location::UNKNOWN),
    };
    if mode == Mode::Off {
        return Ok(None);
    }
    let mut b = Builder {
        path,
        problems: Vec::new(),
    };

    // algorithms
    let mut algorithms: Vec<Algorithm> = Vec::new();
    match &cfg.algorithms {
        None => algorithms.push(Algorithm::RS256),
        Some(list) => {
            if list.is_empty() {
                b.push(mode_loc, "algorithms", "at least one algorithm is required");
            }
            for (i, a) in list.iter().enumerate() {
                match parse_algorithm(&a.value) {
                    Ok(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
                    Ok(_) => {}
                    Err(m) => b.push(a.referenced, &format!("algorithms[{i}]"), m),
                }
            }
        }
    }
    let algs_known = !algorithms.is_empty();

    // keys
    let mut keys: Vec<StaticKey> = Vec::new();
    for (i, k) in cfg.keys.iter().flatten().enumerate() {
        let kp = format!("keys[{i}]");
        if let Some(key) = b.key(k, &kp, &algorithms, algs_known, mode_loc) {
            if let (Some(kid), Some(loc)) = (&key.kid, k.kid.as_ref().map(|s| s.referenced)) {
                if keys.iter().any(|x| x.kid.as_deref() == Some(kid.as_str())) {
                    b.push(loc, &format!("{kp}.kid"), format!("duplicate kid `{kid}`"));
                }
            }
            keys.push(key);
        }
    }

    // jwks_url
    let jwks_url = match &cfg.jwks_url {
        None => None,
        Some(u) => match check_jwks_url(&u.value) {
            Ok(()) => {
                if algs_known
                    && !algorithms
                        .iter()
                        .any(|a| a.family() != AlgorithmFamily::Hmac)
                {
                    b.push(
                        u.referenced,
                        "jwks_url",
                        "a JWKS only provides public keys (HS secrets are never taken from it), \
                         but only HS algorithms are pinned",
                    );
                }
                Some(u.value.clone())
            }
            Err(m) => {
                b.push(u.referenced, "jwks_url", m);
                None
            }
        },
    };
    // OpenID Connect Discovery
    let discovery = cfg.discovery.as_ref().filter(|d| d.value);
    let discovery_url = match (discovery, &cfg.issuer) {
        (None, _) => None,
        (Some(d), _) if cfg.jwks_url.is_some() => {
            b.push(
                d.referenced,
                "discovery",
                "set either jwks_url or discovery: true, not both",
            );
            None
        }
        (Some(d), None) => {
            b.push(
                d.referenced,
                "discovery",
                "needs issuer: the document is read from {issuer}/.well-known/openid-configuration",
            );
            None
        }
        (Some(d), Some(iss)) => {
            let url = discovery_url_of(&iss.value);
            match check_jwks_url(&url) {
                Ok(()) => {
                    if algs_known
                        && !algorithms
                            .iter()
                            .any(|a| a.family() != AlgorithmFamily::Hmac)
                    {
                        b.push(
                            d.referenced,
                            "discovery",
                            "a JWKS only provides public keys (HS secrets are never taken from it), \
                             but only HS algorithms are pinned",
                        );
                    }
                    Some(url)
                }
                Err(m) => {
                    b.push(iss.referenced, "issuer", format!("discovery: {m}"));
                    None
                }
            }
        }
    };
    let keys_given = cfg.keys.as_ref().is_some_and(|k| !k.is_empty());
    if !keys_given && cfg.jwks_url.is_none() && discovery.is_none() {
        b.push(
            mode_loc,
            "keys",
            "at least one key, a jwks_url or discovery is required when jwt.mode is not off",
        );
    }

    // durations
    let jwks_refresh = b.duration(&cfg.jwks_refresh, "jwks_refresh", Duration::from_secs(600));
    if !jwks_refresh.is_zero() && jwks_refresh < Duration::from_secs(1) {
        if let Some(s) = &cfg.jwks_refresh {
            b.push(
                s.referenced,
                "jwks_refresh",
                "must be at least 1s (or 0s for no periodic refresh)",
            );
        }
    }
    let leeway = b.duration(&cfg.leeway, "leeway", Duration::from_secs(30));
    if leeway > MAX_LEEWAY {
        if let Some(s) = &cfg.leeway {
            b.push(s.referenced, "leeway", "must be at most 1h");
        }
    }

    // issuer, audience, required claims
    let issuer = match &cfg.issuer {
        Some(s) if s.value.is_empty() => {
            b.push(
                s.referenced,
                "issuer",
                "must not be empty (omit it or use null)",
            );
            None
        }
        Some(s) => Some(s.value.clone()),
        None => None,
    };
    let mut audience: Vec<String> = Vec::new();
    for (i, a) in cfg.audience.iter().flatten().enumerate() {
        if a.value.is_empty() {
            b.push(a.referenced, &format!("audience[{i}]"), "must not be empty");
        } else if !audience.contains(&a.value) {
            audience.push(a.value.clone());
        }
    }
    let mut required_claims: Vec<String> = Vec::new();
    match &cfg.required_claims {
        None => required_claims.push("exp".to_string()),
        Some(list) => {
            for (i, c) in list.iter().enumerate() {
                if c.value.is_empty() {
                    b.push(
                        c.referenced,
                        &format!("required_claims[{i}]"),
                        "must not be empty",
                    );
                } else if !required_claims.contains(&c.value) {
                    required_claims.push(c.value.clone());
                }
            }
        }
    }

    // token sources
    let mut token_sources: Vec<TokenSource> = Vec::new();
    match &cfg.token_sources {
        None => token_sources.push(TokenSource::Header),
        Some(list) => {
            if list.is_empty() {
                b.push(
                    mode_loc,
                    "token_sources",
                    "at least one token source is required",
                );
            }
            for (i, s) in list.iter().enumerate() {
                let sp = format!("token_sources[{i}]");
                match TokenSource::parse(&s.value) {
                    Ok(t) if token_sources.contains(&t) => {
                        b.push(s.referenced, &sp, format!("duplicate token source `{t}`"));
                    }
                    Ok(t) => token_sources.push(t),
                    Err(m) => b.push(s.referenced, &sp, m),
                }
            }
        }
    }

    // forward_claims
    let mut forward_claims: Vec<(String, HeaderName)> = Vec::new();
    for (claim, header) in cfg.forward_claims.iter().flatten() {
        let cp = format!("forward_claims.{claim}");
        if claim.is_empty() {
            b.push(header.referenced, &cp, "the claim name must not be empty");
            continue;
        }
        match forward_header(&header.value) {
            Ok(name) => {
                if forward_claims.iter().any(|(_, h)| *h == name) {
                    b.push(
                        header.referenced,
                        &cp,
                        format!("header `{name}` is already used by another claim"),
                    );
                } else {
                    forward_claims.push((claim.clone(), name));
                }
            }
            Err(m) => b.push(header.referenced, &cp, m),
        }
    }

    if !b.problems.is_empty() {
        return Err(b.problems);
    }
    Ok(Some(Jwt {
        mode,
        algorithms,
        keys,
        jwks_url,
        discovery_url,
        jwks_refresh,
        issuer,
        audience,
        leeway,
        required_claims,
        token_sources,
        forward_claims,
        close_on_expiry: cfg.close_on_expiry.unwrap_or(true),
        forward_token: cfg.forward_token.unwrap_or(false),
    }))
}

struct Builder<'a> {
    path: &'a str,
    problems: Vec<Problem>,
}

impl Builder<'_> {
    fn push(&mut self, loc: Location, sub: &str, message: impl Into<String>) {
        let p = if sub.is_empty() {
            self.path.to_string()
        } else {
            format!("{}.{sub}", self.path)
        };
        self.problems.push((loc, p, message.into()));
    }

    fn duration(&mut self, v: &Option<Str>, sub: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(&s.value) {
                Ok(d) => d,
                Err(e) => {
                    self.push(s.referenced, sub, e);
                    default
                }
            },
        }
    }

    /// One entry of `keys`. `algs_known` is false when the algorithm list
    /// itself is broken: then family checks are skipped (they would only
    /// repeat that problem).
    fn key(
        &mut self,
        k: &JwtKeyConfig,
        kp: &str,
        pinned: &[Algorithm],
        algs_known: bool,
        mode_loc: Location,
    ) -> Option<StaticKey> {
        let loc = [&k.kid, &k.file, &k.secret_env, &k.secret_file]
            .into_iter()
            .flatten()
            .map(|s| s.referenced)
            .next()
            .unwrap_or(mode_loc);
        let kid = match &k.kid {
            Some(s) if s.value.is_empty() => {
                self.push(s.referenced, &format!("{kp}.kid"), "must not be empty");
                return None;
            }
            Some(s) => Some(s.value.clone()),
            None => None,
        };
        let (key, algorithms) = match (&k.file, &k.secret_env, &k.secret_file) {
            (Some(f), None, None) => {
                let (key, family_algs) = match read_pem_key(&f.value) {
                    Ok(x) => x,
                    Err(m) => {
                        self.push(f.referenced, &format!("{kp}.file"), m);
                        return None;
                    }
                };
                let algs: Vec<Algorithm> = pinned
                    .iter()
                    .copied()
                    .filter(|a| family_algs.contains(a))
                    .collect();
                if algs.is_empty() && algs_known {
                    self.push(
                        f.referenced,
                        &format!("{kp}.file"),
                        format!(
                            "this key can verify {} but none of these is in `algorithms`",
                            names(&family_algs)
                        ),
                    );
                    return None;
                }
                (key, algs)
            }
            (None, Some(env), None) => {
                let secret = match std::env::var(&env.value) {
                    Ok(v) => v.into_bytes(),
                    Err(std::env::VarError::NotPresent) => {
                        self.push(
                            env.referenced,
                            &format!("{kp}.secret_env"),
                            format!("environment variable `{}` is not set", env.value),
                        );
                        return None;
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        self.push(
                            env.referenced,
                            &format!("{kp}.secret_env"),
                            format!("environment variable `{}` is not valid UTF-8", env.value),
                        );
                        return None;
                    }
                };
                let algs = self.hs_secret(
                    &secret,
                    env.referenced,
                    &format!("{kp}.secret_env"),
                    pinned,
                    algs_known,
                )?;
                (DecodingKey::from_secret(&secret), algs)
            }
            (None, None, Some(file)) => {
                let mut secret = match crate::files::read_bounded(std::path::Path::new(&file.value))
                {
                    Ok(v) => v,
                    Err(e) => {
                        self.push(
                            file.referenced,
                            &format!("{kp}.secret_file"),
                            format!("cannot read `{}`: {e}", file.value),
                        );
                        return None;
                    }
                };
                // A file written by `echo` or an editor ends with a newline
                // that is not part of the secret.
                while secret.last().is_some_and(|&c| c == b'\n' || c == b'\r') {
                    secret.pop();
                }
                let algs = self.hs_secret(
                    &secret,
                    file.referenced,
                    &format!("{kp}.secret_file"),
                    pinned,
                    algs_known,
                )?;
                (DecodingKey::from_secret(&secret), algs)
            }
            (None, None, None) => {
                self.push(
                    loc,
                    kp,
                    "one of file, secret_env or secret_file is required",
                );
                return None;
            }
            _ => {
                self.push(
                    loc,
                    kp,
                    "exactly one of file, secret_env or secret_file is allowed",
                );
                return None;
            }
        };
        if algorithms.is_empty() {
            return None;
        }
        Some(StaticKey {
            kid,
            key,
            algorithms,
        })
    }

    /// Checks an HS secret; returns the pinned HS algorithms it may verify.
    fn hs_secret(
        &mut self,
        secret: &[u8],
        loc: Location,
        sub: &str,
        pinned: &[Algorithm],
        algs_known: bool,
    ) -> Option<Vec<Algorithm>> {
        if secret.len() < MIN_HS_SECRET {
            self.push(
                loc,
                sub,
                format!(
                    "the HS secret is {} bytes; at least {MIN_HS_SECRET} are required (RFC 7518 section 3.2)",
                    secret.len()
                ),
            );
            return None;
        }
        let hs: Vec<Algorithm> = pinned
            .iter()
            .copied()
            .filter(|a| a.family() == AlgorithmFamily::Hmac)
            .collect();
        if hs.is_empty() {
            if algs_known {
                self.push(
                    loc,
                    sub,
                    "an HS secret needs an HS algorithm (HS256, HS384 or HS512) in `algorithms`",
                );
            }
            return None;
        }
        // RFC 7518 section 3.2: the key must be at least as long as the hash.
        let usable: Vec<Algorithm> = hs
            .iter()
            .copied()
            .filter(|a| secret.len() >= hs_min_len(*a))
            .collect();
        if usable.is_empty() {
            let need = hs
                .iter()
                .map(|a| hs_min_len(*a))
                .min()
                .unwrap_or(MIN_HS_SECRET);
            self.push(
                loc,
                sub,
                format!(
                    "the HS secret is {} bytes; {} needs at least {need} (RFC 7518 section 3.2)",
                    secret.len(),
                    names(&hs)
                ),
            );
            return None;
        }
        Some(usable)
    }
}

fn hs_min_len(a: Algorithm) -> usize {
    match a {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => MIN_HS_SECRET,
    }
}

fn names(algs: &[Algorithm]) -> String {
    algs.iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    if s.eq_ignore_ascii_case("none") {
        return Err("`none` is never accepted: an unsigned token proves nothing".to_string());
    }
    SUPPORTED
        .iter()
        .copied()
        .find(|a| format!("{a:?}") == s)
        .ok_or_else(|| format!("unknown algorithm `{s}` (use one of {})", names(&SUPPORTED)))
}

/// OpenID Connect Discovery 1.0 section 4: the issuer without a trailing
/// `/`, then `/.well-known/openid-configuration`.
fn discovery_url_of(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

fn check_jwks_url(s: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials must not be written in the URL".to_string());
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" => match url.host_str() {
            Some("127.0.0.1" | "localhost" | "[::1]") => Ok(()),
            _ => Err(format!(
                "`{s}`: a JWKS must be fetched over https:// (plain http:// only from 127.0.0.1 or localhost)"
            )),
        },
        other => Err(format!("`{s}`: unsupported scheme `{other}` (use https://)")),
    }
}

pub(crate) fn forward_header(s: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| format!("`{s}` is not a valid header name"))?;
    let n = name.as_str();
    // A claim may not travel under a name wsguard sets itself or never
    // forwards (it would be dropped on the way), nor as Host.
    if crate::handshake::DROP.contains(&n) || n == "host" || n.starts_with("sec-websocket-") {
        return Err(format!(
            "`{n}` cannot carry a claim: wsguard sets it itself or it is hop-by-hop"
        ));
    }
    // A name with `_` is never forwarded (contract section 7): the claim
    // would never reach the backend.
    if n.contains('_') {
        return Err(format!(
            "`{n}` cannot carry a claim: a header name with `_` is never forwarded (use `-`)"
        ));
    }
    Ok(name)
}

/// Reads a PEM public key; returns it with every algorithm it could verify.
fn read_pem_key(file: &str) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read `{file}`: {e}"))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "`{file}` is larger than 64 KiB; not a PEM public key"
        ));
    }
    let bytes = crate::files::read_bounded(std::path::Path::new(file))
        .map_err(|e| format!("cannot read `{file}`: {e}"))?;
    pem_key(&bytes).map_err(|m| format!("`{file}`: {m}"))
}

fn pem_key(bytes: &[u8]) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    let text = String::from_utf8_lossy(bytes);
    let label = text
        .find("-----BEGIN ")
        .and_then(|i| text.get(i + 11..))
        .and_then(|rest| rest.find("-----").and_then(|j| rest.get(..j)))
        .ok_or("not a PEM file")?;
    if label.contains("PRIVATE KEY") {
        return Err(
            "is a private key; give the public key (`openssl pkey -in KEY -pubout`)".to_string(),
        );
    }
    if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
        return Err(format!(
            "expected a public key (-----BEGIN PUBLIC KEY-----), found -----BEGIN {label}-----"
        ));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        let bits = match key.kind() {
            DecodingKeyKind::SecretOrDer(der) => rsa_der_modulus_bits(der),
            DecodingKeyKind::RsaModulusExponent { n, .. } => Some(bit_len(n)),
        }
        .ok_or("not a valid RSA public key")?;
        check_rsa_bits(bits)?;
        return Ok((key, AlgorithmFamily::Rsa.algorithms().to_vec()));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        let len = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
        return match len {
            65 => Ok((key, vec![Algorithm::ES256])),
            97 => Ok((key, vec![Algorithm::ES384])),
            _ => Err("unsupported EC key (only P-256 and P-384 are supported)".to_string()),
        };
    }
    if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        if key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0) != 32 {
            return Err("not a valid Ed25519 public key".to_string());
        }
        return Ok((key, vec![Algorithm::EdDSA]));
    }
    Err("not an RSA, EC (P-256, P-384) or Ed25519 public key".to_string())
}

fn check_rsa_bits(bits: usize) -> Result<(), String> {
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!(
            "RSA key of {bits} bits; at most {MAX_RSA_BITS} are supported"
        ));
    }
    Ok(())
}

/// Bit length of a big-endian unsigned integer.
fn bit_len(n: &[u8]) -> usize {
    let n = match n.iter().position(|&b| b != 0) {
        Some(i) => n.get(i..).unwrap_or_default(),
        None => return 0,
    };
    match n.first() {
        Some(&top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    }
}

/// One DER TLV: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (len_bytes, r) = (rest.get(..n)?, rest.get(n..)?);
        rest = r;
        len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// Modulus size of a PKCS#1 `RSAPublicKey` (SEQUENCE { INTEGER n, INTEGER e }).
fn rsa_der_modulus_bits(der: &[u8]) -> Option<usize> {
    let (tag, seq, _) = der_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, n, rest) = der_tlv(seq)?;
    let (etag, _, _) = der_tlv(rest)?;
    if tag != 0x02 || etag != 0x02 {
        return None;
    }
    Some(bit_len(n))
}

// ---------------------------------------------------------------------------
// Extraction and removal

/// A token found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub token: String,
    /// Index into the configured `token_sources`.
    pub source: usize,
}

/// Looks for a token in the configured order; the first source that has one
/// wins. `protocols` are the requested subprotocols, already split on commas
/// and trimmed.
pub fn extract(
    sources: &[TokenSource],
    headers: &HeaderMap,
    path_and_query: &str,
    protocols: &[String],
) -> Option<Found> {
    sources.iter().enumerate().find_map(|(i, s)| {
        let token = match s {
            TokenSource::Header => bearer(headers),
            TokenSource::Query(name) => query_param(path_and_query, name),
            TokenSource::Cookie(name) => cookie(headers, name),
            TokenSource::Subprotocol(prefix) => protocols.iter().find_map(|p| {
                p.strip_prefix(prefix.as_str())
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
            }),
        }?;
        Some(Found { token, source: i })
    })
}

/// A token in more than one place: several sources carry one, one source
/// carries several (query parameters, cookies, subprotocols), or the
/// request has more than one `Authorization` header (RFC 6750 section 2:
/// `invalid_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ambiguous;

/// Like [`extract`], but looks at every configured source: exactly one
/// token in all of them is `Ok(Some)`, none is `Ok(None)`, more is
/// [`Ambiguous`].
pub fn find(
    sources: &[TokenSource],
    headers: &HeaderMap,
    path_and_query: &str,
    protocols: &[String],
) -> Result<Option<Found>, Ambiguous> {
    let mut found: Option<Found> = None;
    let mut count = 0usize;
    for (i, s) in sources.iter().enumerate() {
        let tokens: Vec<String> = match s {
            TokenSource::Header => {
                if headers.get_all(AUTHORIZATION).iter().count() > 1 {
                    return Err(Ambiguous);
                }
                bearer(headers).into_iter().collect()
            }
            TokenSource::Query(name) => query_of(path_and_query)
                .into_iter()
                .flat_map(|q| q.split('&'))
                .filter(|seg| param_is(seg, name))
                .filter_map(|seg| seg.split_once('=').map(|(_, v)| v))
                .filter_map(percent_decode)
                .filter(|v| !v.is_empty())
                .collect(),
            TokenSource::Cookie(name) => {
                let values = headers
                    .get_all(COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok());
                cookie_pairs(values)
                    .filter(|(n, _)| *n == name)
                    .map(|(_, v)| {
                        v.strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or(v)
                    })
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            TokenSource::Subprotocol(prefix) => protocols
                .iter()
                .filter_map(|p| p.strip_prefix(prefix.as_str()))
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
        };
        count += tokens.len();
        if count > 1 {
            return Err(Ambiguous);
        }
        if let Some(token) = tokens.into_iter().next() {
            found = Some(Found { token, source: i });
        }
    }
    Ok(found)
}

/// Removes from the request every configured token source except
/// `keep` (the index of the consumed source when `forward_token` is set):
/// the Authorization header, the query parameters, the cookies and the
/// subprotocol entries.
pub fn strip_sources(
    sources: &[TokenSource],
    keep: Option<usize>,
    headers: &mut HeaderMap,
    path_and_query: &mut String,
    protocols: &mut Vec<String>,
) {
    for (i, s) in sources.iter().enumerate() {
        if keep == Some(i) {
            continue;
        }
        match s {
            TokenSource::Header => strip_header(headers),
            TokenSource::Query(name) => *path_and_query = strip_query(path_and_query, name),
            TokenSource::Cookie(name) => {
                if !headers.contains_key(COOKIE) {
                    continue;
                }
                // A Cookie header that is not ASCII cannot be parsed here,
                // so it is not forwarded at all (it could hide a token).
                let values: Vec<String> = headers
                    .get_all(COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok().map(str::to_string))
                    .collect();
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                let rest = strip_cookie(&refs, name);
                headers.remove(COOKIE);
                if let Some(v) = rest.and_then(|r| HeaderValue::from_str(&r).ok()) {
                    headers.insert(COOKIE, v);
                }
            }
            TokenSource::Subprotocol(prefix) => *protocols = strip_subprotocol(protocols, prefix),
        }
    }
}

/// `Authorization: Bearer <token>` (scheme case-insensitive). Several
/// Authorization headers are ambiguous and yield nothing.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let v = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let v = v.to_str().ok()?.trim_matches([' ', '\t']);
    let (scheme, rest) = v.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches([' ', '\t']);
    if token.is_empty() || token.contains([' ', '\t']) {
        return None;
    }
    Some(token.to_string())
}

fn query_of(path_and_query: &str) -> Option<&str> {
    let (_, q) = path_and_query.split_once('?')?;
    Some(q.split_once('#').map_or(q, |(q, _)| q))
}

/// Whether one `k=v` query segment is the parameter `name` (the key is
/// compared percent-decoded).
fn param_is(segment: &str, name: &str) -> bool {
    let key = segment.split_once('=').map_or(segment, |(k, _)| k);
    key == name || percent_decode(key).as_deref() == Some(name)
}

/// The first non-empty value of query parameter `name`, percent-decoded.
fn query_param(path_and_query: &str, name: &str) -> Option<String> {
    query_of(path_and_query)?
        .split('&')
        .filter(|seg| param_is(seg, name))
        .filter_map(|seg| seg.split_once('=').map(|(_, v)| v))
        .filter_map(percent_decode)
        .find(|v| !v.is_empty())
}

/// Lenient percent-decoding (`%` not followed by two hex digits is kept);
/// None when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Removes every parameter `name` from the query; the other parameters are
/// kept byte for byte, and a query left empty loses its `?`.
pub fn strip_query(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|seg| !param_is(seg, name))
        .collect();
    let kept = kept.join("&");
    let mut out = path.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept);
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// `name=value` pairs of Cookie header values (RFC 6265 section 5.4 / 4.2.1).
fn cookie_pairs<'a>(
    values: impl Iterator<Item = &'a str>,
) -> impl Iterator<Item = (&'a str, &'a str)> {
    values
        .flat_map(|v| v.split(';'))
        .map(|c| c.trim_matches([' ', '\t']))
        .filter(|c| !c.is_empty())
        .map(|c| match c.split_once('=') {
            Some((n, v)) => (n.trim_matches([' ', '\t']), v.trim_matches([' ', '\t'])),
            None => ("", c),
        })
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    let values = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    cookie_pairs(values)
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| {
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
        .find(|v| !v.is_empty())
        .map(str::to_string)
}

/// The Cookie header without cookie `name` (all its copies); the other
/// cookies are kept in order, joined with `; `. None if nothing is left.
pub fn strip_cookie(cookie_header_values: &[&str], name: &str) -> Option<String> {
    let kept: Vec<&str> = cookie_header_values
        .iter()
        .flat_map(|v| v.split(';'))
        .map(|c| c.trim_matches([' ', '\t']))
        .filter(|c| !c.is_empty())
        .filter(|c| {
            let n = c
                .split_once('=')
                .map_or("", |(n, _)| n.trim_matches([' ', '\t']));
            n != name
        })
        .collect();
    if kept.is_empty() {
        None
    } else {
        Some(kept.join("; "))
    }
}

/// The requested subprotocols without the ones carrying a token (those
/// starting with `prefix` and longer than it).
pub fn strip_subprotocol(protocols: &[String], prefix: &str) -> Vec<String> {
    protocols
        .iter()
        .filter(|p| !(p.starts_with(prefix) && p.len() > prefix.len()))
        .cloned()
        .collect()
}

/// Removes the `Authorization` header (the `header` source).
pub fn strip_header(headers: &mut HeaderMap) {
    headers.remove(AUTHORIZATION);
}

// ---------------------------------------------------------------------------
// Verification

/// The verified claims.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("no token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not allowed")]
    AlgNotAllowed,
    #[error("no key for this token")]
    UnknownKey,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong token issuer")]
    WrongIssuer,
    #[error("wrong token audience")]
    WrongAudience,
    #[error("token lacks claim `{0}`")]
    MissingClaim(String),
    #[error("token claim `{0}` has an invalid value")]
    InvalidClaim(String),
}

impl JwtError {
    /// Stable snake_case label (for `wsguard_rejections_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Missing => "jwt_missing",
            JwtError::Malformed => "jwt_malformed",
            JwtError::AlgNotAllowed => "jwt_alg_not_allowed",
            JwtError::UnknownKey => "jwt_unknown_key",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::WrongIssuer => "jwt_wrong_issuer",
            JwtError::WrongAudience => "jwt_wrong_audience",
            JwtError::MissingClaim(_) => "jwt_missing_claim",
            JwtError::InvalidClaim(_) => "jwt_invalid_claim",
        }
    }

    pub fn is_missing(&self) -> bool {
        matches!(self, JwtError::Missing)
    }

    /// `WWW-Authenticate` value for the 401 (RFC 6750 section 3: no error
    /// code when the request carried no token).
    pub fn www_authenticate(&self) -> &'static str {
        if self.is_missing() {
            "Bearer"
        } else {
            "Bearer error=\"invalid_token\""
        }
    }
}

/// The verifier: static keys plus an optional JWKS cache. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    jwt: Arc<Jwt>,
    /// Per pinned algorithm, the claim checks jsonwebtoken applies.
    validations: Vec<(Algorithm, Validation)>,
    /// The keys of `jwks_url`. In the proxy this is the process-wide cache
    /// of that URL ([`crate::runtime::Shared`] keeps one per URL across
    /// reloads); a verifier built alone has its own.
    jwks: Option<Arc<JwksCache>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.inner.jwt.algorithms)
            .field("static_keys", &self.inner.jwt.keys.len())
            .field("jwks_keys", &self.jwks_keys())
            .field("jwks_fetches", &self.jwks_fetches())
            .finish()
    }
}

/// The keys of one JWKS URL: the last good document's usable keys, fetched
/// at start, refreshed in the background, refetched on an unknown kid (at
/// most once per `refetch_every`). A failed fetch keeps the last good keys.
///
/// Keys are parsed for every supported algorithm, so routes that pin
/// different algorithms can share one cache: a verifier only ever tries a
/// key for the token's algorithm, which it has already checked is pinned.
pub struct JwksCache {
    /// The JWKS URL, or the discovery document's URL.
    url: String,
    /// Discovery: the issuer the document must name exactly.
    discovery_issuer: Option<String>,
    keys: ArcSwap<Vec<StaticKey>>,
    client: Option<reqwest::Client>,
    /// Serializes fetches so an older answer never overwrites a newer one.
    fetch_lock: tokio::sync::Mutex<()>,
    /// When an unknown kid last caused a refetch.
    refetch_gate: tokio::sync::Mutex<Option<Instant>>,
    refetch_every: Duration,
    fetches: AtomicU64,
    /// Fetches finished (either way): a caller that finds this moved while
    /// it waited for `fetch_lock` takes that fetch's result instead of
    /// fetching again.
    done: AtomicU64,
    failing: AtomicBool,
}

impl fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksCache")
            .field("url", &self.url)
            .field("keys", &self.keys.load().len())
            .field("fetches", &self.fetches())
            .finish()
    }
}

impl JwksCache {
    /// An empty cache for `url`; nothing is fetched until [`JwksCache::run`]
    /// or [`JwksCache::refresh`].
    pub fn new(url: &str) -> Arc<JwksCache> {
        JwksCache::with_refetch_interval(url, UNKNOWN_KID_REFETCH)
    }

    fn with_refetch_interval(url: &str, refetch_every: Duration) -> Arc<JwksCache> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(JWKS_TIMEOUT)
            .connect_timeout(JWKS_TIMEOUT)
            .build()
            .map_err(|e| tracing::error!(error = %e, "cannot build the JWKS HTTP client"))
            .ok();
        Arc::new(JwksCache {
            url: url.to_string(),
            discovery_issuer: None,
            keys: ArcSwap::from_pointee(Vec::new()),
            client,
            fetch_lock: tokio::sync::Mutex::new(()),
            refetch_gate: tokio::sync::Mutex::new(None),
            refetch_every,
            fetches: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// A cache fed through OpenID Connect Discovery: each refresh reads the
    /// document at `doc_url`, refuses it unless its `issuer` is exactly
    /// `issuer`, and fetches the JWKS its `jwks_uri` names (https, or http
    /// to a loopback address).
    pub fn discovery(doc_url: &str, issuer: &str) -> Arc<JwksCache> {
        let mut c = JwksCache::with_refetch_interval(doc_url, UNKNOWN_KID_REFETCH);
        if let Some(c) = Arc::get_mut(&mut c) {
            c.discovery_issuer = Some(issuer.to_string());
        }
        c
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Number of fetches attempted so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The keys currently held.
    pub fn keys(&self) -> Arc<Vec<StaticKey>> {
        self.keys.load_full()
    }

    /// The refresher of this URL: an initial fetch when `initial` (bounded
    /// by a short timeout; a failure is logged, not fatal), then one every
    /// `every` (never when zero), until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, every: Duration, initial: bool, stop: CancellationToken) {
        if initial {
            tokio::select! {
                _ = stop.cancelled() => return,
                // Skipped if a handshake's unknown kid fetched first.
                r = tokio::time::timeout(JWKS_START_TIMEOUT, self.refresh_unless_done_since(0)) => {
                    if r.is_err() {
                        tracing::warn!(url = %self.url, "initial JWKS fetch timed out; will retry in the background");
                    }
                }
            }
        }
        if every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.refresh() => {}
            }
        }
    }

    /// Fetches the JWKS now; on success its keys replace the previous ones.
    /// Returns whether the fetch succeeded.
    pub async fn refresh(&self) -> bool {
        let _serial = self.fetch_lock.lock().await;
        self.refresh_locked().await
    }

    /// Like [`JwksCache::refresh`], unless a fetch finished since `done`
    /// read `seen` (then that fetch's keys stand).
    async fn refresh_unless_done_since(&self, seen: u64) -> bool {
        let _serial = self.fetch_lock.lock().await;
        if self.done.load(Ordering::Acquire) != seen {
            return !self.failing.load(Ordering::Relaxed);
        }
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> bool {
        let url = self.url.as_str();
        let fetched = self.fetch().await;
        self.done.fetch_add(1, Ordering::Release);
        match fetched {
            Ok(keys) => {
                let n = keys.len();
                self.keys.store(Arc::new(keys));
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(url, keys = n, "JWKS fetch recovered");
                } else {
                    tracing::debug!(url, keys = n, "JWKS fetched");
                }
                true
            }
            Err(e) => {
                if self.failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(url, error = %e, "JWKS fetch still failing");
                } else {
                    tracing::warn!(url, error = %e, "JWKS fetch failed; keeping the last good keys");
                }
                false
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<StaticKey>, String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let jwks_url = match &self.discovery_issuer {
            None => self.url.clone(),
            Some(issuer) => self.discover(issuer).await?,
        };
        let body = self.get(&jwks_url).await?;
        parse_jwks(&body, &SUPPORTED)
    }

    /// Reads the discovery document and returns its `jwks_uri`.
    async fn discover(&self, issuer: &str) -> Result<String, String> {
        let body = self.get(&self.url).await?;
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("discovery document is not JSON: {e}"))?;
        let named = doc
            .get("issuer")
            .and_then(|v| v.as_str())
            .ok_or("discovery document has no `issuer`")?;
        if named != issuer {
            tracing::error!(
                url = %self.url,
                document_issuer = named,
                configured_issuer = issuer,
                "OIDC discovery refused: the document's issuer is not jwt.issuer (they must be equal exactly); its keys are not used"
            );
            return Err(format!(
                "discovery document names issuer `{named}`, jwt.issuer is `{issuer}`"
            ));
        }
        let uri = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or("discovery document has no `jwks_uri`")?;
        check_jwks_url(uri).map_err(|e| format!("discovery document's jwks_uri: {e}"))?;
        Ok(uri.to_string())
    }

    /// GET `url`: a 2xx answer of at most [`JWKS_MAX_BYTES`], no redirects.
    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let client = self.client.as_ref().ok_or("no HTTP client")?;
        let mut resp = client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > JWKS_MAX_BYTES as u64)
        {
            return Err(format!("document larger than {JWKS_MAX_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading failed: {e}"))?
        {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(format!("document larger than {JWKS_MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A token needs a key nobody has: refetch, at most once per
    /// `refetch_every` over all kids. Callers arriving while a refetch runs
    /// wait for it (and then see its keys) instead of fetching again.
    async fn refetch_for_unknown_key(&self) {
        let seen = self.done.load(Ordering::Acquire);
        let mut last = self.refetch_gate.lock().await;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.refetch_every) {
            return;
        }
        *last = Some(now);
        self.refresh_unless_done_since(seen).await;
    }
}

fn validation_for(jwt: &Jwt, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    // Clamped: jsonwebtoken computes `now - leeway`.
    v.leeway = jwt.leeway.min(MAX_LEEWAY).as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut spec: HashSet<String> = jwt
        .required_claims
        .iter()
        .filter(|c| matches!(c.as_str(), "exp" | "nbf" | "iss" | "aud" | "sub"))
        .cloned()
        .collect();
    if let Some(iss) = &jwt.issuer {
        v.set_issuer(&[iss]);
        spec.insert("iss".to_string());
    }
    if jwt.audience.is_empty() {
        // Like Envoy: no audience configured means `aud` is not checked.
        v.validate_aud = false;
    } else {
        v.set_audience(&jwt.audience);
        spec.insert("aud".to_string());
    }
    v.required_spec_claims = spec;
    v
}

/// The parts of the JOSE header this verifier looks at.
struct Head {
    alg: Algorithm,
    kid: Option<String>,
}

fn parse_head(token: &str, pinned: &[Algorithm]) -> Result<Head, JwtError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let b64url = |x: &str| {
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !b64url(h) {
        return Err(JwtError::Malformed);
    }
    let raw = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed)?;
    let head: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&raw).map_err(|_| JwtError::Malformed)?;
    if head.contains_key("crit") {
        // RFC 7515 section 4.1.11: no extension is understood here.
        return Err(JwtError::Malformed);
    }
    let alg = head
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or(JwtError::Malformed)?;
    let alg = pinned
        .iter()
        .copied()
        .find(|p| format!("{p:?}") == alg)
        .ok_or(JwtError::AlgNotAllowed)?;
    // Checked after `alg`, so that an unsigned `alg: none` token is
    // reported as such rather than as malformed.
    if !b64url(p) || !b64url(s) {
        return Err(JwtError::Malformed);
    }
    let kid = match head.get("kid") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    Ok(Head { alg, kid })
}

/// Outcome of checking a token against one key.
enum Try {
    Accepted(Claims),
    /// The signature does not verify with this key: try the next one.
    NextKey,
    Refused(JwtError),
}

fn map_error(kind: &ErrorKind) -> Try {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::Provider(_) => Try::NextKey,
        ErrorKind::MissingRequiredClaim(c) => Try::Refused(JwtError::MissingClaim(c.clone())),
        ErrorKind::InvalidClaimFormat(c) => Try::Refused(JwtError::InvalidClaim(c.clone())),
        ErrorKind::ExpiredSignature => Try::Refused(JwtError::Expired),
        ErrorKind::ImmatureSignature => Try::Refused(JwtError::NotYetValid),
        ErrorKind::InvalidIssuer => Try::Refused(JwtError::WrongIssuer),
        ErrorKind::InvalidAudience => Try::Refused(JwtError::WrongAudience),
        ErrorKind::InvalidSubject => Try::Refused(JwtError::InvalidClaim("sub".to_string())),
        ErrorKind::MissingAlgorithm | ErrorKind::InvalidAlgorithmName => {
            Try::Refused(JwtError::AlgNotAllowed)
        }
        _ => Try::Refused(JwtError::Malformed),
    }
}

impl Verifier {
    /// A verifier with a JWKS cache of its own (when `jwks_url` is set).
    /// Does not fetch: call [`Verifier::start`] for the initial JWKS fetch
    /// and the background refresh. The proxy uses
    /// [`Verifier::with_cache`] instead, with the process-wide cache.
    pub fn new(jwt: Arc<Jwt>) -> Verifier {
        let cache = jwt.new_jwks_cache();
        Verifier::with_cache(jwt, cache)
    }

    #[cfg(test)]
    fn with_refetch_interval(jwt: Arc<Jwt>, refetch_every: Duration) -> Verifier {
        let cache = jwt
            .jwks_url
            .as_deref()
            .map(|u| JwksCache::with_refetch_interval(u, refetch_every));
        Verifier::with_cache(jwt, cache)
    }

    /// A verifier that reads the JWKS keys from `cache` (which must be the
    /// cache of `jwt.jwks_url`; the caller runs its refresher).
    pub fn with_cache(jwt: Arc<Jwt>, cache: Option<Arc<JwksCache>>) -> Verifier {
        let validations = jwt
            .algorithms
            .iter()
            .map(|&a| (a, validation_for(&jwt, a)))
            .collect();
        Verifier {
            inner: Arc::new(Inner {
                jwt,
                validations,
                jwks: cache,
            }),
        }
    }

    /// The policy this verifier enforces.
    pub fn jwt(&self) -> &Arc<Jwt> {
        &self.inner.jwt
    }

    /// Number of JWKS fetches attempted so far.
    pub fn jwks_fetches(&self) -> u64 {
        self.inner.jwks.as_ref().map_or(0, |c| c.fetches())
    }

    /// Number of JWKS keys currently usable with the pinned algorithms.
    pub fn jwks_keys(&self) -> usize {
        let pinned = &self.inner.jwt.algorithms;
        self.inner.jwks.as_ref().map_or(0, |c| {
            c.keys()
                .iter()
                .filter(|k| k.algorithms.iter().any(|a| pinned.contains(a)))
                .count()
        })
    }

    /// For a verifier built with [`Verifier::new`]: the initial JWKS fetch
    /// (bounded by a short timeout; a failure is logged, not fatal) and a
    /// background refresh every `jwks_refresh`, until `shutdown` is
    /// cancelled or every clone of this verifier is dropped. Does nothing
    /// without a `jwks_url`.
    pub async fn start(&self, shutdown: CancellationToken) {
        let Some(cache) = self.inner.jwks.clone() else {
            return;
        };
        if tokio::time::timeout(JWKS_START_TIMEOUT, cache.refresh())
            .await
            .is_err()
        {
            tracing::warn!("initial JWKS fetch timed out; will retry in the background");
        }
        let every = self.inner.jwt.jwks_refresh;
        if every.is_zero() {
            return;
        }
        let weak: Weak<JwksCache> = Arc::downgrade(&cache);
        drop(cache);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let Some(cache) = weak.upgrade() else { break };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = cache.refresh() => {}
                }
            }
        });
    }

    /// Fetches the JWKS now; on success its keys replace the previous JWKS
    /// keys. Returns whether the fetch succeeded.
    pub async fn refresh(&self) -> bool {
        match &self.inner.jwks {
            Some(c) => c.refresh().await,
            None => false,
        }
    }

    /// Verifies a token and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let inner = &self.inner;
        let head = parse_head(token, &inner.jwt.algorithms)?;
        let empty = Arc::new(Vec::new());
        let mut jwks = inner.jwks.as_ref().map_or(empty, |c| c.keys());
        let mut found = self.candidates(&jwks, &head, true);
        if found.is_empty() {
            if let Some(cache) = &inner.jwks {
                cache.refetch_for_unknown_key().await;
                jwks = cache.keys();
                found = self.candidates(&jwks, &head, true);
            }
        }
        if found.is_empty() && head.kid.is_some() {
            found = self.candidates(&jwks, &head, false);
        }
        if found.is_empty() {
            return Err(JwtError::UnknownKey);
        }
        let validation = inner
            .validations
            .iter()
            .find(|(a, _)| *a == head.alg)
            .map(|(_, v)| v)
            .ok_or(JwtError::AlgNotAllowed)?;
        for key in found {
            match check(token, key, validation) {
                Try::Accepted(claims) => return self.required(claims),
                Try::NextKey => {}
                Try::Refused(e) => return Err(e),
            }
        }
        Err(JwtError::BadSignature)
    }

    /// Every required claim, including ones jsonwebtoken does not know.
    fn required(&self, claims: Claims) -> Result<Claims, JwtError> {
        match self
            .inner
            .jwt
            .required_claims
            .iter()
            .find(|c| claims.get(c.as_str()).is_none_or(|v| v.is_null()))
        {
            Some(c) => Err(JwtError::MissingClaim(c.clone())),
            None => Ok(claims),
        }
    }

    /// Keys that may verify this token. With `by_kid`, a token with a kid
    /// gets the keys with that kid, and a token without one every key of a
    /// matching algorithm; without `by_kid` (fallback for a kid nobody
    /// has), the keys that have no kid.
    fn candidates<'a>(
        &'a self,
        jwks: &'a [StaticKey],
        head: &Head,
        by_kid: bool,
    ) -> Vec<&'a StaticKey> {
        self.inner
            .jwt
            .keys
            .iter()
            .chain(jwks.iter())
            .filter(|k| k.accepts(head.alg))
            .filter(|k| match (&head.kid, by_kid) {
                (None, _) => true,
                (Some(kid), true) => k.kid.as_deref() == Some(kid.as_str()),
                (Some(_), false) => k.kid.is_none(),
            })
            .collect()
    }
}

fn check(token: &str, key: &StaticKey, validation: &Validation) -> Try {
    match jsonwebtoken::decode::<Claims>(token, &key.key, validation) {
        Ok(data) => Try::Accepted(data.claims),
        Err(e) => map_error(e.kind()),
    }
}

/// The usable signature keys of a JWKS document.
fn parse_jwks(body: &[u8], pinned: &[Algorithm]) -> Result<Vec<StaticKey>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let list = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("no `keys` array")?;
    let mut keys = Vec::new();
    for item in list {
        if keys.len() >= JWKS_MAX_KEYS {
            break;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(item.clone()) else {
            continue;
        };
        if let Some(k) = jwks_key(&jwk, pinned) {
            keys.push(k);
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "no usable signature key among {} (pinned: {})",
            list.len(),
            names(pinned)
        ));
    }
    Ok(keys)
}

fn jwks_key(jwk: &Jwk, pinned: &[Algorithm]) -> Option<StaticKey> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let mut algs: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms().to_vec(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        // Symmetric keys are never taken from a JWKS.
        _ => return None,
    };
    if let Some(declared) = jwk.common.key_algorithm {
        let declared = Algorithm::from_str(&declared.to_string()).ok()?;
        algs.retain(|a| *a == declared);
    }
    algs.retain(|a| pinned.contains(a));
    if algs.is_empty() {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    let ok = match (key.kind(), &jwk.algorithm) {
        (DecodingKeyKind::RsaModulusExponent { n, .. }, _) => check_rsa_bits(bit_len(n)).is_ok(),
        (DecodingKeyKind::SecretOrDer(b), AlgorithmParameters::EllipticCurve(p)) => {
            b.len()
                == if p.curve == EllipticCurve::P256 {
                    65
                } else {
                    97
                }
        }
        (DecodingKeyKind::SecretOrDer(b), AlgorithmParameters::OctetKeyPair(_)) => b.len() == 32,
        _ => false,
    };
    if !ok {
        return None;
    }
    Some(StaticKey {
        kid: jwk.common.key_id.clone(),
        key,
        algorithms: algs,
    })
}

/// A claim value as a header value: strings as they are, anything else
/// JSON-encoded. None when it cannot be a header value (control characters).
pub fn claim_header_value(v: &serde_json::Value) -> Option<HeaderValue> {
    match v {
        serde_json::Value::String(s) => HeaderValue::from_str(s).ok(),
        other => HeaderValue::from_str(&serde_json::to_string(other).ok()?).ok(),
    }
}

/// The `exp` claim in seconds since the epoch, if numeric and not negative.
pub fn exp_of(claims: &Claims) -> Option<u64> {
    let exp = claims.get("exp")?;
    exp.as_u64().or_else(|| {
        exp.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const RSA_PRIV: &str = include_str!("../../tests/fixtures/jwt/rsa_private.pem");
    const RSA_PUB: &str = include_str!("../../tests/fixtures/jwt/rsa_public.pem");
    const EC1_PRIV: &str = include_str!("../../tests/fixtures/jwt/ec1_private.pem");
    const EC1_PUB: &str = include_str!("../../tests/fixtures/jwt/ec1_public.pem");
    const EC2_PRIV: &str = include_str!("../../tests/fixtures/jwt/ec2_private.pem");
    const EC2_PUB: &str = include_str!("../../tests/fixtures/jwt/ec2_public.pem");
    const ED_PRIV: &str = include_str!("../../tests/fixtures/jwt/ed_private.pem");
    const SECRET: &str = "an HS256 test secret of more than 32 bytes";

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    /// A file in the temp dir holding `content`; returns its path.
    /// A fresh file per call: tests run in parallel, and rewriting a shared
    /// path while another test reads it gives it a truncated secret.
    fn temp_file(name: &str, content: &str) -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wsguard-jwt-{}-{n}-{name}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn config(yaml: &str) -> JwtConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    /// Builds a policy from YAML; `{RSA_PUB}`, `{EC1_PUB}`, `{ED_PUB}` and
    /// `{SECRET_FILE}` are replaced by fixture paths.
    fn policy(yaml: &str) -> Arc<Jwt> {
        let yaml = yaml
            .replace("{RSA_PUB}", &fixture("rsa_public.pem"))
            .replace("{EC1_PUB}", &fixture("ec1_public.pem"))
            .replace("{ED_PUB}", &fixture("ed_public.pem"))
            .replace(
                "{SECRET_FILE}",
                &temp_file("hs-secret", &format!("{SECRET}\n")),
            );
        match build(&config(&yaml), "jwt") {
            Ok(Some(j)) => Arc::new(j),
            Ok(None) => panic!("mode off"),
            Err(p) => panic!("{p:?}"),
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims() -> serde_json::Value {
        json!({ "sub": "alice", "exp": now() + 600, "iat": now() })
    }

    fn token(
        alg: Algorithm,
        kid: Option<&str>,
        claims: &serde_json::Value,
        key: &EncodingKey,
    ) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, key).unwrap()
    }

    fn hs() -> EncodingKey {
        EncodingKey::from_secret(SECRET.as_bytes())
    }
    fn rsa() -> EncodingKey {
        EncodingKey::from_rsa_pem(RSA_PRIV.as_bytes()).unwrap()
    }
    fn ec1() -> EncodingKey {
        EncodingKey::from_ec_pem(EC1_PRIV.as_bytes()).unwrap()
    }
    fn ec2() -> EncodingKey {
        EncodingKey::from_ec_pem(EC2_PRIV.as_bytes()).unwrap()
    }

    fn b64(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    /// A token with an arbitrary header, HMAC-SHA256-signed with `secret`.
    fn hand_signed(header: serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = jsonwebtoken::crypto::sign(
            msg.as_bytes(),
            &EncodingKey::from_secret(secret),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{msg}.{sig}")
    }

    fn ec_jwk(public_pem: &str, kid: &str) -> serde_json::Value {
        let k = DecodingKey::from_ec_pem(public_pem.as_bytes()).unwrap();
        let p = k.try_get_as_bytes().unwrap();
        assert_eq!(p.len(), 65);
        json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&p[1..33]), "y": b64(&p[33..65]),
        })
    }

    fn jwks(keys: &[serde_json::Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    // -- a JWKS server -------------------------------------------------------

    struct JwksServer {
        /// Status and body of every answer; status 0 = close without answering.
        answer: Mutex<(u16, String)>,
        hits: AtomicUsize,
    }

    impl JwksServer {
        fn set(&self, status: u16, body: String) {
            *self.answer.lock().unwrap() = (status, body);
        }
        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    async fn serve(status: u16, body: String) -> (Arc<JwksServer>, String) {
        let state = Arc::new(JwksServer {
            answer: Mutex::new((status, body)),
            hits: AtomicUsize::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    break;
                };
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 2048];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    st.hits.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = st.answer.lock().unwrap().clone();
                    if status == 0 {
                        return;
                    }
                    let extra = if (300..400).contains(&status) {
                        format!("location: {body}\r\n")
                    } else {
                        String::new()
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (state, url)
    }

    fn es256_jwks_policy(url: &str) -> Arc<Jwt> {
        policy(&format!(
            "mode: enforce\nalgorithms: [ES256]\njwks_url: \"{url}\"\njwks_refresh: 0s\n"
        ))
    }

    // -- valid tokens ----------------------------------------------------------

    #[tokio::test]
    async fn hs256_token_verifies() {
        let v = Verifier::new(policy(
            "mode: enforce\nalgorithms: [HS256]\nkeys: [{secret_file: \"{SECRET_FILE}\"}]\n",
        ));
        let c = v
            .verify(&token(Algorithm::HS256, None, &claims(), &hs()))
            .await
            .unwrap();
        assert_eq!(c["sub"], "alice");
    }

    #[tokio::test]
    async fn rs256_token_verifies_with_a_pem_key() {
        let v = Verifier::new(policy("mode: enforce\nkeys: [{file: \"{RSA_PUB}\"}]\n"));
        let c = v
            .verify(&token(Algorithm::RS256, None, &claims(), &rsa()))
            .await
            .unwrap();
        assert_eq!(c["sub"], "alice");
        // A kid the policy does not know still finds a key configured without one.
        let c = v
            .verify(&token(Algorithm::RS256, Some("idp-1"), &claims(), &rsa()))
            .await;
        assert!(c.is_ok());
        // PS256 is the same key family but not pinned.
        let t = token(Algorithm::PS256, None, &claims(), &rsa());
        assert_eq!(v.verify(&t).await, Err(JwtError::AlgNotAllowed));
    }

    #[tokio::test]
    async fn eddsa_and_es256_pem_keys_verify() {
        let v = Verifier::new(policy(
            "mode: enforce\nalgorithms: [EdDSA, ES256]\nkeys: [{file: \"{ED_PUB}\"}, {file: \"{EC1_PUB}\"}]\n",
        ));
        let ed = EncodingKey::from_ed_pem(ED_PRIV.as_bytes()).unwrap();
        assert!(v
            .verify(&token(Algorithm::EdDSA, None, &claims(), &ed))
            .await
            .is_ok());
        assert!(v
            .verify(&token(Algorithm::ES256, None, &claims(), &ec1()))
            .await
            .is_ok());
        assert_eq!(
            v.verify(&token(Algorithm::ES256, None, &claims(), &ec2()))
                .await,
            Err(JwtError::BadSignature)
        );
    }

    #[tokio::test]
    async fn es256_token_verifies_with_a_jwks_key() {
        let (srv, url) = serve(200, jwks(&[ec_jwk(EC1_PUB, "e1")])).await;
        let v = Verifier::new(es256_jwks_policy(&url));
        assert_eq!(v.jwks_fetches(), 0, "new() does not fetch");
        v.start(CancellationToken::new()).await;
        assert_eq!((v.jwks_fetches(), srv.hits(), v.jwks_keys()), (1, 1, 1));
        let c = v
            .verify(&token(Algorithm::ES256, Some("e1"), &claims(), &ec1()))
            .await
            .unwrap();
        assert_eq!(c["sub"], "alice");
        // Without a kid, every JWKS key of the algorithm is tried.
        assert!(v
            .verify(&token(Algorithm::ES256, None, &claims(), &ec1()))
            .await
            .is_ok());
        // The right kid but another key's signature.
        assert_eq!(
            v.verify(&token(Algorithm::ES256, Some("e1"), &claims(), &ec2()))
                .await,
            Err(JwtError::BadSignature)
        );
        assert_eq!(v.jwks_fetches(), 1);
    }

    // -- refusals --------------------------------------------------------------

    async fn rs_verifier(extra: &str) -> Verifier {
        Verifier::new(policy(&format!(
            "mode: enforce\nkeys: [{{file: \"{{RSA_PUB}}\"}}]\n{extra}"
        )))
    }

    async fn refused(v: &Verifier, claims: serde_json::Value) -> JwtError {
        v.verify(&token(Algorithm::RS256, None, &claims, &rsa()))
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn time_claims_are_enforced_with_leeway() {
        let v = rs_verifier("leeway: 30s\n").await;
        let e = refused(&v, json!({ "sub": "a", "exp": now() - 3600 })).await;
        assert_eq!((e.clone(), e.reason()), (JwtError::Expired, "jwt_expired"));
        // Expired 10 s ago: within the 30 s leeway.
        assert!(v
            .verify(&token(
                Algorithm::RS256,
                None,
                &json!({ "exp": now() - 10 }),
                &rsa()
            ))
            .await
            .is_ok());
        let e = refused(&v, json!({ "exp": now() + 600, "nbf": now() + 3600 })).await;
        assert_eq!(e, JwtError::NotYetValid);
        // A non-numeric exp does not count as present...
        let e = refused(&v, json!({ "exp": "tomorrow" })).await;
        assert_eq!(e, JwtError::MissingClaim("exp".into()));
        // ...and is invalid even when exp is not required.
        let v = rs_verifier("required_claims: []\n").await;
        let e = refused(&v, json!({ "exp": "tomorrow" })).await;
        assert_eq!(e, JwtError::InvalidClaim("exp".into()));
        let e = refused(&v, json!({ "nbf": "later" })).await;
        assert_eq!(e, JwtError::InvalidClaim("nbf".into()));
    }

    #[tokio::test]
    async fn issuer_and_audience_are_enforced() {
        let v = rs_verifier("issuer: https://idp.example\naudience: [api, ws]\n").await;
        let ok = json!({ "exp": now() + 60, "iss": "https://idp.example", "aud": "ws" });
        assert!(v
            .verify(&token(Algorithm::RS256, None, &ok, &rsa()))
            .await
            .is_ok());
        let ok =
            json!({ "exp": now() + 60, "iss": "https://idp.example", "aud": ["other", "api"] });
        assert!(v
            .verify(&token(Algorithm::RS256, None, &ok, &rsa()))
            .await
            .is_ok());
        let e = refused(
            &v,
            json!({ "exp": now() + 60, "iss": "https://evil.example", "aud": "ws" }),
        )
        .await;
        assert_eq!(e, JwtError::WrongIssuer);
        let e = refused(
            &v,
            json!({ "exp": now() + 60, "iss": "https://idp.example", "aud": "other" }),
        )
        .await;
        assert_eq!(e, JwtError::WrongAudience);
        // Configured issuer/audience make the claims required.
        let e = refused(&v, json!({ "exp": now() + 60, "aud": "ws" })).await;
        assert_eq!(e, JwtError::MissingClaim("iss".into()));
        let e = refused(
            &v,
            json!({ "exp": now() + 60, "iss": "https://idp.example" }),
        )
        .await;
        assert_eq!(e, JwtError::MissingClaim("aud".into()));
        // Without a configured audience, `aud` is not checked.
        let v = rs_verifier("").await;
        assert!(v
            .verify(&token(
                Algorithm::RS256,
                None,
                &json!({ "exp": now() + 60, "aud": "x" }),
                &rsa()
            ))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn required_claims_are_enforced() {
        let v = rs_verifier("required_claims: [exp, sub, tenant]\n").await;
        let e = refused(&v, json!({ "exp": now() + 60, "sub": "a" })).await;
        assert_eq!(e, JwtError::MissingClaim("tenant".into()));
        assert_eq!(e.reason(), "jwt_missing_claim");
        let e = refused(&v, json!({ "exp": now() + 60, "tenant": "t" })).await;
        assert_eq!(e, JwtError::MissingClaim("sub".into()));
        let e = refused(&v, json!({ "sub": "a", "tenant": "t" })).await;
        assert_eq!(e, JwtError::MissingClaim("exp".into()));
        let e = refused(&v, json!({ "exp": now() + 60, "sub": "a", "tenant": null })).await;
        assert_eq!(e, JwtError::MissingClaim("tenant".into()));
        let ok = json!({ "exp": now() + 60, "sub": "a", "tenant": "t" });
        assert!(v
            .verify(&token(Algorithm::RS256, None, &ok, &rsa()))
            .await
            .is_ok());
        // The default requires exp.
        let v = rs_verifier("").await;
        assert_eq!(
            refused(&v, json!({ "sub": "a" })).await,
            JwtError::MissingClaim("exp".into())
        );
        // required_claims: [] accepts a token without exp.
        let v = rs_verifier("required_claims: []\n").await;
        assert!(v
            .verify(&token(
                Algorithm::RS256,
                None,
                &json!({ "sub": "a" }),
                &rsa()
            ))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn alg_none_and_unpinned_algorithms_are_refused() {
        let v = Verifier::new(policy(
            "mode: enforce\nalgorithms: [HS256, RS256]\nkeys: [{secret_file: \"{SECRET_FILE}\"}, {file: \"{RSA_PUB}\"}]\n",
        ));
        let body = b64(claims().to_string().as_bytes());
        for alg in ["none", "None", "NONE", "nOnE"] {
            let head = b64(json!({ "alg": alg, "typ": "JWT" }).to_string().as_bytes());
            for sig in ["", "c2ln"] {
                let t = format!("{head}.{body}.{sig}");
                assert_eq!(
                    v.verify(&t).await,
                    Err(JwtError::AlgNotAllowed),
                    "{alg} {sig:?}"
                );
            }
        }
        // HS384 and ES256 are valid algorithms, but not pinned.
        let t = token(
            Algorithm::HS384,
            None,
            &claims(),
            &EncodingKey::from_secret(&[7u8; 64]),
        );
        assert_eq!(v.verify(&t).await, Err(JwtError::AlgNotAllowed));
        let t = token(Algorithm::ES256, None, &claims(), &ec1());
        let e = v.verify(&t).await.unwrap_err();
        assert_eq!(
            (e.clone(), e.reason()),
            (JwtError::AlgNotAllowed, "jwt_alg_not_allowed")
        );
    }

    #[tokio::test]
    async fn algorithm_confusion_is_refused() {
        // A naive verifier takes "the key" and uses it with whatever alg the
        // header names; with the RSA public key PEM as HMAC secret, an
        // attacker who knows the public key forges HS256 tokens.
        let pem = RSA_PUB.as_bytes();
        let der = DecodingKey::from_rsa_pem(pem)
            .unwrap()
            .try_get_as_bytes()
            .unwrap()
            .to_vec();
        let naive = EncodingKey::from_secret(pem);
        let forged = token(Algorithm::HS256, None, &claims(), &naive);
        // Only RS256 pinned: the HS token is refused on its alg.
        let v = rs_verifier("").await;
        assert_eq!(v.verify(&forged).await, Err(JwtError::AlgNotAllowed));

        // Both families pinned, an RSA key (kid rsa) and an unrelated HS secret.
        let v = Verifier::new(policy(
            "mode: enforce\nalgorithms: [RS256, HS256]\nkeys: [{kid: rsa, file: \"{RSA_PUB}\"}, {kid: hs, secret_file: \"{SECRET_FILE}\"}]\n",
        ));
        for secret in [pem, der.as_slice()] {
            let t = hand_signed(json!({ "alg": "HS256" }), &claims(), secret);
            assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
            // Pointing the kid at the RSA key does not make it an HMAC key.
            let t = hand_signed(json!({ "alg": "HS256", "kid": "rsa" }), &claims(), secret);
            assert_eq!(v.verify(&t).await, Err(JwtError::UnknownKey));
            // An "RS256" token whose signature is an HMAC with the PEM as secret.
            let t = hand_signed(json!({ "alg": "RS256", "kid": "rsa" }), &claims(), secret);
            assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
            let t = hand_signed(json!({ "alg": "RS256" }), &claims(), secret);
            assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
        }
        // The genuine tokens of both families still pass.
        assert!(v
            .verify(&token(Algorithm::RS256, Some("rsa"), &claims(), &rsa()))
            .await
            .is_ok());
        assert!(v
            .verify(&token(Algorithm::HS256, Some("hs"), &claims(), &hs()))
            .await
            .is_ok());
        // An HS token naming the RSA key's kid, signed with the real secret.
        let t = token(Algorithm::HS256, Some("rsa"), &claims(), &hs());
        assert_eq!(v.verify(&t).await, Err(JwtError::UnknownKey));
    }

    #[tokio::test]
    async fn key_hints_in_the_header_are_ignored() {
        let v = rs_verifier("").await;
        // An embedded JWK (the attacker's own key) is not used.
        let mut h = Header::new(Algorithm::ES256);
        h.jwk = Some(Jwk::from_encoding_key(&ec2(), Algorithm::ES256).unwrap());
        h.jku = Some("https://evil.example/jwks.json".into());
        let t = encode(&h, &claims(), &ec2()).unwrap();
        assert_eq!(v.verify(&t).await, Err(JwtError::AlgNotAllowed));
        let v = Verifier::new(policy(
            "mode: enforce\nalgorithms: [ES256]\nkeys: [{file: \"{EC1_PUB}\"}]\n",
        ));
        assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
        // A token with `crit` is refused: no extension is understood.
        let mut h = Header::new(Algorithm::ES256);
        h.crit = Some(vec!["exp".into()]);
        let t = encode(&h, &claims(), &ec1()).unwrap();
        assert_eq!(v.verify(&t).await, Err(JwtError::Malformed));
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let v = rs_verifier("").await;
        let good = token(Algorithm::RS256, None, &claims(), &rsa());
        let parts: Vec<&str> = good.split('.').collect();
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        let cases = [
            "".to_string(),
            "garbage".to_string(),
            "a.b".to_string(),
            "a.b.c".to_string(),
            "a.b.c.d".to_string(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.x"),
            format!("{}.!!!.{}", parts[0], parts[2]),
            format!("{}.{}.%%%", parts[0], parts[1]),
            format!("{}.{}.{}", b64(b"[1]"), parts[1], parts[2]),
            format!("{}.{}.{}", b64(b"{\"typ\":\"JWT\"}"), parts[1], parts[2]),
            format!(
                "{}.{}.{}",
                b64(b"{\"alg\":\"RS256\",\"kid\":7}"),
                parts[1],
                parts[2]
            ),
            long,
        ];
        for t in cases {
            let e = v.verify(&t).await.unwrap_err();
            assert_eq!(e, JwtError::Malformed, "{t}");
            assert_eq!(e.reason(), "jwt_malformed");
        }
        // A payload that is not a JSON object, correctly signed.
        let t = hand_signed(json!({ "alg": "HS256" }), &json!([1, 2]), SECRET.as_bytes());
        let hsv = Verifier::new(policy(
            "mode: enforce\nalgorithms: [HS256]\nkeys: [{secret_file: \"{SECRET_FILE}\"}]\n",
        ));
        assert_eq!(hsv.verify(&t).await, Err(JwtError::Malformed));
        // A tampered payload.
        let t = format!(
            "{}.{}.{}",
            parts[0],
            b64(json!({ "sub": "root", "exp": now() + 60 })
                .to_string()
                .as_bytes()),
            parts[2]
        );
        assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
    }

    #[tokio::test]
    async fn kids_select_keys() {
        let v = Verifier::new(policy(
            "mode: enforce\nalgorithms: [ES256]\nkeys: [{kid: one, file: \"{EC1_PUB}\"}]\n",
        ));
        assert!(v
            .verify(&token(Algorithm::ES256, Some("one"), &claims(), &ec1()))
            .await
            .is_ok());
        assert!(v
            .verify(&token(Algorithm::ES256, None, &claims(), &ec1()))
            .await
            .is_ok());
        let e = v
            .verify(&token(Algorithm::ES256, Some("two"), &claims(), &ec1()))
            .await
            .unwrap_err();
        assert_eq!(
            (e.clone(), e.reason()),
            (JwtError::UnknownKey, "jwt_unknown_key")
        );
    }

    // -- JWKS ------------------------------------------------------------------

    #[tokio::test]
    async fn jwks_rotation_is_picked_up_on_an_unknown_kid() {
        let (srv, url) = serve(200, jwks(&[ec_jwk(EC1_PUB, "e1")])).await;
        let v =
            Verifier::with_refetch_interval(es256_jwks_policy(&url), Duration::from_millis(300));
        v.start(CancellationToken::new()).await;
        let t2 = token(Algorithm::ES256, Some("e2"), &claims(), &ec2());
        // Before rotation: e2 unknown, one refetch, still unknown.
        assert_eq!(v.verify(&t2).await, Err(JwtError::UnknownKey));
        assert_eq!(v.jwks_fetches(), 2);
        // The IdP publishes e2; within the throttle window nothing is fetched.
        srv.set(200, jwks(&[ec_jwk(EC1_PUB, "e1"), ec_jwk(EC2_PUB, "e2")]));
        assert_eq!(v.verify(&t2).await, Err(JwtError::UnknownKey));
        assert_eq!(v.jwks_fetches(), 2);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(v.verify(&t2).await.is_ok());
        assert_eq!(v.jwks_fetches(), 3);
        // Known kids never fetch.
        assert!(v
            .verify(&token(Algorithm::ES256, Some("e1"), &claims(), &ec1()))
            .await
            .is_ok());
        assert!(v.verify(&t2).await.is_ok());
        assert_eq!(v.jwks_fetches(), 3);
        // e1 retired: its tokens stop verifying once the set is refetched.
        srv.set(200, jwks(&[ec_jwk(EC2_PUB, "e2")]));
        assert!(v.refresh().await);
        let t1 = token(Algorithm::ES256, Some("e1"), &claims(), &ec1());
        assert_eq!(v.verify(&t1).await, Err(JwtError::UnknownKey));
        assert_eq!(srv.hits() as u64, v.jwks_fetches());
    }

    #[tokio::test]
    async fn first_unknown_kid_refetches_immediately_with_the_default_throttle() {
        let (srv, url) = serve(200, jwks(&[ec_jwk(EC1_PUB, "e1")])).await;
        let v = Verifier::new(es256_jwks_policy(&url));
        v.start(CancellationToken::new()).await;
        srv.set(200, jwks(&[ec_jwk(EC2_PUB, "e2")]));
        assert!(v
            .verify(&token(Algorithm::ES256, Some("e2"), &claims(), &ec2()))
            .await
            .is_ok());
        assert_eq!(v.jwks_fetches(), 2);
    }

    #[tokio::test]
    async fn jwks_outage_keeps_the_last_good_keys() {
        let (srv, url) = serve(200, jwks(&[ec_jwk(EC1_PUB, "e1")])).await;
        let v = Verifier::with_refetch_interval(es256_jwks_policy(&url), Duration::ZERO);
        v.start(CancellationToken::new()).await;
        let t1 = token(Algorithm::ES256, Some("e1"), &claims(), &ec1());
        let unknown = token(Algorithm::ES256, Some("zz"), &claims(), &ec2());
        assert!(v.verify(&t1).await.is_ok());
        let too_big = format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(JWKS_MAX_BYTES));
        let bad_answers = [
            (500, "oops".to_string()),
            (0, String::new()),
            (200, "not json".to_string()),
            (200, "{\"keys\":[]}".to_string()),
            (
                200,
                jwks(&[json!({ "kty": "oct", "k": b64(SECRET.as_bytes()), "kid": "e1" })]),
            ),
            (
                200,
                jwks(&[json!({ "kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "tiny" })]),
            ),
            (200, too_big),
            (302, format!("{url}?moved")),
        ];
        for (status, body) in bad_answers {
            srv.set(status, body.clone());
            assert!(!v.refresh().await, "{status} {body:.60}");
            assert_eq!(v.verify(&unknown).await, Err(JwtError::UnknownKey));
            assert!(v.verify(&t1).await.is_ok(), "{status} {body:.60}");
            assert_eq!(v.jwks_keys(), 1);
        }
        srv.set(200, jwks(&[ec_jwk(EC2_PUB, "e2")]));
        assert!(v.refresh().await);
        assert_eq!(v.verify(&t1).await, Err(JwtError::UnknownKey));
    }

    #[tokio::test]
    async fn jwks_keys_are_filtered() {
        let mut enc = ec_jwk(EC2_PUB, "enc");
        enc["use"] = json!("enc");
        let mut es384 = ec_jwk(EC2_PUB, "es384");
        es384["alg"] = json!("ES384");
        let mut no_alg = ec_jwk(EC2_PUB, "noalg");
        no_alg.as_object_mut().unwrap().remove("alg");
        let body = jwks(&[
            json!({ "kty": "weird", "kid": "w" }),
            json!({ "kty": "oct", "k": b64(SECRET.as_bytes()), "kid": "hs" }),
            enc,
            es384,
            no_alg,
            ec_jwk(EC1_PUB, "e1"),
        ]);
        let keys = parse_jwks(body.as_bytes(), &[Algorithm::ES256, Algorithm::HS256]).unwrap();
        let kids: Vec<_> = keys.iter().map(|k| k.kid.clone().unwrap()).collect();
        assert_eq!(kids, ["noalg", "e1"]);
        assert!(parse_jwks(body.as_bytes(), &[Algorithm::RS256]).is_err());
    }

    #[tokio::test]
    async fn an_unknown_kid_flood_fetches_a_bounded_number_of_times() {
        let (srv, url) = serve(200, jwks(&[ec_jwk(EC1_PUB, "e1")])).await;
        let v = Verifier::new(es256_jwks_policy(&url));
        v.start(CancellationToken::new()).await;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..50 {
            let v = v.clone();
            let t = token(
                Algorithm::ES256,
                Some(&format!("flood-{i}")),
                &claims(),
                &ec2(),
            );
            set.spawn(async move { v.verify(&t).await });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap(), Err(JwtError::UnknownKey));
        }
        for i in 50..100 {
            let t = token(
                Algorithm::ES256,
                Some(&format!("flood-{i}")),
                &claims(),
                &ec2(),
            );
            assert_eq!(v.verify(&t).await, Err(JwtError::UnknownKey));
        }
        assert!(v.jwks_fetches() <= 2, "{} fetches", v.jwks_fetches());
        assert!(srv.hits() <= 2);
        assert!(v
            .verify(&token(Algorithm::ES256, Some("e1"), &claims(), &ec1()))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn background_refresh_runs_until_cancelled() {
        let (_srv, url) = serve(200, jwks(&[ec_jwk(EC1_PUB, "e1")])).await;
        let mut jwt = (*es256_jwks_policy(&url)).clone();
        jwt.jwks_refresh = Duration::from_millis(100);
        let v = Verifier::new(Arc::new(jwt));
        let stop = CancellationToken::new();
        v.start(stop.clone()).await;
        // A second start is a no-op.
        v.start(stop.clone()).await;
        // Initial fetch plus at least two refreshes (polled: CI can be slow).
        let deadline = Instant::now() + Duration::from_secs(10);
        while v.jwks_fetches() < 3 {
            assert!(Instant::now() < deadline, "{} fetches", v.jwks_fetches());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = v.jwks_fetches();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(v.jwks_fetches(), n);
    }

    #[tokio::test]
    async fn an_unreachable_jwks_does_not_block_start() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks", l.local_addr().unwrap());
        drop(l);
        let v = Verifier::new(es256_jwks_policy(&url));
        v.start(CancellationToken::new()).await;
        assert_eq!((v.jwks_fetches(), v.jwks_keys()), (1, 0));
        let t = token(Algorithm::ES256, Some("e1"), &claims(), &ec1());
        assert_eq!(v.verify(&t).await, Err(JwtError::UnknownKey));
        // No jwks_url: start does nothing.
        let v = rs_verifier("").await;
        v.start(CancellationToken::new()).await;
        assert_eq!(v.jwks_fetches(), 0);
    }

    // -- extraction and removal ----------------------------------------------

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn one(src: TokenSource, h: &HeaderMap, pq: &str, protos: &[&str]) -> Option<String> {
        let protos: Vec<String> = protos.iter().map(|s| s.to_string()).collect();
        extract(&[src], h, pq, &protos).map(|f| f.token)
    }

    #[test]
    fn bearer_header() {
        let get = |v: &[(&str, &str)]| one(TokenSource::Header, &headers(v), "/", &[]);
        assert_eq!(
            get(&[("authorization", "Bearer abc.def.ghi")]).as_deref(),
            Some("abc.def.ghi")
        );
        assert_eq!(
            get(&[("authorization", "bearer   abc ")]).as_deref(),
            Some("abc")
        );
        assert_eq!(
            get(&[("authorization", "BEARER\tabc")]).as_deref(),
            Some("abc")
        );
        assert_eq!(get(&[("authorization", "Basic dXNlcjpwYXNz")]), None);
        assert_eq!(get(&[("authorization", "Bearer")]), None);
        assert_eq!(get(&[("authorization", "Bearer ")]), None);
        assert_eq!(get(&[("authorization", "Bearer a b")]), None);
        assert_eq!(get(&[("authorization", "Bearerabc")]), None);
        assert_eq!(
            get(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]),
            None
        );
        assert_eq!(get(&[]), None);
        let mut h = headers(&[("authorization", "Bearer a"), ("x-other", "1")]);
        strip_header(&mut h);
        assert!(h.get(AUTHORIZATION).is_none());
        assert!(h.get("x-other").is_some());
    }

    #[test]
    fn query_parameter() {
        let q = |pq: &str| {
            one(
                TokenSource::Query("access_token".into()),
                &HeaderMap::new(),
                pq,
                &[],
            )
        };
        assert_eq!(
            q("/ws?a=1&access_token=tok.en&b=2").as_deref(),
            Some("tok.en")
        );
        assert_eq!(q("/ws?access_token=tok").as_deref(), Some("tok"));
        assert_eq!(q("/ws?access_token=a%2Eb").as_deref(), Some("a.b"));
        assert_eq!(q("/ws?access%5Ftoken=tok").as_deref(), Some("tok"));
        assert_eq!(
            q("/ws?access_token=&access_token=second").as_deref(),
            Some("second")
        );
        assert_eq!(q("/ws?xaccess_token=1&access_tokens=2"), None);
        assert_eq!(q("/ws?access_token"), None);
        assert_eq!(q("/ws"), None);
        assert_eq!(q("/access_token=tok"), None);

        assert_eq!(
            strip_query("/ws?a=1&access_token=tok&b=2", "access_token"),
            "/ws?a=1&b=2"
        );
        assert_eq!(strip_query("/ws?access_token=tok", "access_token"), "/ws");
        assert_eq!(
            strip_query("/ws?access_token=tok&b=%20x", "access_token"),
            "/ws?b=%20x"
        );
        assert_eq!(
            strip_query("/ws?a=1&access_token=tok", "access_token"),
            "/ws?a=1"
        );
        assert_eq!(
            strip_query("/ws?access_token=1&a=x&access_token=2", "access_token"),
            "/ws?a=x"
        );
        assert_eq!(
            strip_query("/ws?access%5Ftoken=1&a=x", "access_token"),
            "/ws?a=x"
        );
        assert_eq!(
            strip_query("/ws?access_tokens=1&xaccess_token=2", "access_token"),
            "/ws?access_tokens=1&xaccess_token=2"
        );
        assert_eq!(strip_query("/ws?a=1", "access_token"), "/ws?a=1");
        assert_eq!(strip_query("/ws", "access_token"), "/ws");
        assert_eq!(strip_query("/ws?", "access_token"), "/ws");
    }

    #[test]
    fn cookie_source() {
        let c = |vals: &[&str]| {
            let pairs: Vec<(&str, &str)> = vals.iter().map(|v| ("cookie", *v)).collect();
            one(
                TokenSource::Cookie("session".into()),
                &headers(&pairs),
                "/",
                &[],
            )
        };
        assert_eq!(c(&["a=1; session=tok; b=2"]).as_deref(), Some("tok"));
        assert_eq!(c(&["a=1;session=tok"]).as_deref(), Some("tok"));
        assert_eq!(c(&["session=\"tok\""]).as_deref(), Some("tok"));
        assert_eq!(c(&["  session = tok ;"]).as_deref(), Some("tok"));
        assert_eq!(c(&["session=a=b"]).as_deref(), Some("a=b"));
        assert_eq!(c(&["a=1", "session=tok"]).as_deref(), Some("tok"));
        assert_eq!(c(&["session=; session=later"]).as_deref(), Some("later"));
        assert_eq!(c(&["xsession=1; sessions=2; Session=3"]), None);
        assert_eq!(c(&["session"]), None);
        assert_eq!(c(&[";;"]), None);
        assert_eq!(c(&[]), None);

        assert_eq!(
            strip_cookie(&["a=1; session=tok; b=2"], "session").as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(
            strip_cookie(&["a=1;session=tok", "c=3"], "session").as_deref(),
            Some("a=1; c=3")
        );
        assert_eq!(strip_cookie(&["session=tok"], "session"), None);
        assert_eq!(strip_cookie(&["session=1; session=2"], "session"), None);
        assert_eq!(
            strip_cookie(&["xsession=1; session=2"], "session").as_deref(),
            Some("xsession=1")
        );
        assert_eq!(strip_cookie(&[], "session"), None);
    }

    #[test]
    fn subprotocol_source() {
        let src = TokenSource::Subprotocol("access_token.".into());
        let h = HeaderMap::new();
        assert_eq!(
            one(src.clone(), &h, "/", &["chat", "access_token.a.b.c"]).as_deref(),
            Some("a.b.c")
        );
        assert_eq!(one(src.clone(), &h, "/", &["chat", "access_token."]), None);
        assert_eq!(one(src, &h, "/", &["chat"]), None);
        let protos: Vec<String> = ["chat", "access_token.x", "access_token.", "v2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            strip_subprotocol(&protos, "access_token."),
            ["chat", "access_token.", "v2"]
        );
        assert_eq!(
            strip_subprotocol(&protos[1..2], "access_token."),
            Vec::<String>::new()
        );
    }

    #[test]
    fn sources_are_tried_in_order() {
        let sources = [
            TokenSource::Query("t".into()),
            TokenSource::Header,
            TokenSource::Cookie("c".into()),
        ];
        let h = headers(&[
            ("authorization", "Bearer from-header"),
            ("cookie", "c=from-cookie"),
        ]);
        let f = extract(&sources, &h, "/?t=from-query", &[]).unwrap();
        assert_eq!(
            f,
            Found {
                token: "from-query".into(),
                source: 0
            }
        );
        let f = extract(&sources, &h, "/?x=1", &[]).unwrap();
        assert_eq!(
            f,
            Found {
                token: "from-header".into(),
                source: 1
            }
        );
        let h = headers(&[("cookie", "c=from-cookie")]);
        assert_eq!(extract(&sources, &h, "/", &[]).unwrap().source, 2);
        assert_eq!(extract(&sources, &HeaderMap::new(), "/", &[]), None);
    }

    #[test]
    fn a_token_in_more_than_one_place_is_ambiguous() {
        let sources = [
            TokenSource::Header,
            TokenSource::Query("t".into()),
            TokenSource::Cookie("c".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ];
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let one = headers(&[("authorization", "Bearer a")]);
        assert_eq!(
            find(&sources, &one, "/?x=1", &[]).unwrap().unwrap().source,
            0
        );
        assert_eq!(find(&sources, &one, "/?t=b", &[]), Err(Ambiguous));
        assert_eq!(
            find(&sources, &one, "/?t=", &[]).unwrap().unwrap().source,
            0
        );
        let cookie = headers(&[("authorization", "Bearer a"), ("cookie", "c=b")]);
        assert_eq!(find(&sources, &cookie, "/", &[]), Err(Ambiguous));
        assert_eq!(
            find(&sources, &one, "/", &p(&["chat", "bearer.b"])),
            Err(Ambiguous)
        );
        let two = headers(&[("authorization", "Bearer a"), ("authorization", "Basic x")]);
        assert_eq!(find(&sources, &two, "/", &[]), Err(Ambiguous));
        let none = HeaderMap::new();
        assert_eq!(find(&sources, &none, "/?t=a&t=b", &[]), Err(Ambiguous));
        assert_eq!(
            find(&sources, &headers(&[("cookie", "c=a; c=b")]), "/", &[]),
            Err(Ambiguous)
        );
        assert_eq!(
            find(&sources, &none, "/", &p(&["bearer.a", "bearer.b"])),
            Err(Ambiguous)
        );
        assert_eq!(find(&sources, &none, "/", &p(&["chat"])), Ok(None));
    }

    #[test]
    fn every_source_is_stripped() {
        let sources = [
            TokenSource::Header,
            TokenSource::Query("t".into()),
            TokenSource::Cookie("c".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ];
        let mut h = headers(&[("authorization", "Bearer a"), ("cookie", "c=b; k=1")]);
        let mut pq = "/x?t=c&y=2".to_string();
        let mut protos = vec!["chat".to_string(), "bearer.d".to_string()];
        strip_sources(&sources, None, &mut h, &mut pq, &mut protos);
        assert!(h.get(AUTHORIZATION).is_none());
        assert_eq!(h.get(COOKIE).unwrap(), "k=1");
        assert_eq!(pq, "/x?y=2");
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"tok=forged; caf\xc3\xa9=1").unwrap(),
        );
        h.append(COOKIE, HeaderValue::from_static("k=2"));
        strip_sources(&sources, None, &mut h, &mut pq, &mut protos);
        let left: Vec<_> = h.get_all(COOKIE).iter().collect();
        assert_eq!(left, vec!["k=2"]);
        assert_eq!(protos, vec!["chat"]);
        let mut h = headers(&[("authorization", "Bearer a"), ("cookie", "c=b")]);
        let mut pq = "/x?t=c".to_string();
        strip_sources(&sources, Some(0), &mut h, &mut pq, &mut protos);
        assert_eq!(h.get(AUTHORIZATION).unwrap(), "Bearer a");
        assert!(h.get(COOKIE).is_none());
        assert_eq!(pq, "/x");
    }

    #[test]
    fn claims_as_headers() {
        assert_eq!(claim_header_value(&json!("alice")).unwrap(), "alice");
        assert_eq!(claim_header_value(&json!(42)).unwrap(), "42");
        assert_eq!(claim_header_value(&json!(true)).unwrap(), "true");
        assert_eq!(
            claim_header_value(&json!(["a", "b"])).unwrap(),
            "[\"a\",\"b\"]"
        );
        assert_eq!(claim_header_value(&json!({ "k": 1 })).unwrap(), "{\"k\":1}");
        assert!(claim_header_value(&json!("line\nbreak")).is_none());
        let c: Claims = serde_json::from_value(json!({ "exp": 1700000000 })).unwrap();
        assert_eq!(exp_of(&c), Some(1_700_000_000));
        let c: Claims = serde_json::from_value(json!({ "exp": 1700000000.7 })).unwrap();
        assert_eq!(exp_of(&c), Some(1_700_000_000));
        let c: Claims = serde_json::from_value(json!({ "exp": "soon" })).unwrap();
        assert_eq!(exp_of(&c), None);
        let c: Claims = serde_json::from_value(json!({ "exp": -5 })).unwrap();
        assert_eq!(exp_of(&c), None);
        assert_eq!(exp_of(&Claims::new()), None);
        let jwt = policy("mode: enforce\nkeys: [{file: \"{RSA_PUB}\"}]\nleeway: 30s\n");
        let c: Claims = serde_json::from_value(json!({ "exp": 1000 })).unwrap();
        assert_eq!(
            jwt.session_deadline(&c),
            Some(UNIX_EPOCH + Duration::from_secs(1030))
        );
    }

    #[test]
    fn verifier_is_shareable() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Verifier>();
        check::<Jwt>();
    }

    #[test]
    fn errors_have_stable_reasons() {
        let all = [
            JwtError::Missing,
            JwtError::Malformed,
            JwtError::AlgNotAllowed,
            JwtError::UnknownKey,
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongIssuer,
            JwtError::WrongAudience,
            JwtError::MissingClaim("x".into()),
            JwtError::InvalidClaim("x".into()),
        ];
        let reasons: HashSet<&str> = all.iter().map(JwtError::reason).collect();
        assert_eq!(reasons.len(), all.len());
        assert!(reasons.iter().all(
            |r| r.starts_with("jwt_") && r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        ));
        assert!(JwtError::Missing.is_missing() && !JwtError::Expired.is_missing());
        assert_eq!(JwtError::Missing.www_authenticate(), "Bearer");
        assert!(JwtError::Expired.www_authenticate().starts_with("Bearer "));
    }

    // -- build -----------------------------------------------------------------

    fn problems(yaml: &str, path: &str) -> Vec<(u64, String, String)> {
        match build(&config(yaml), path) {
            Err(p) => p.into_iter().map(|(l, p, m)| (l.line(), p, m)).collect(),
            Ok(_) => panic!("accepted:\n{yaml}"),
        }
    }

    fn paths(p: &[(u64, String, String)]) -> Vec<&str> {
        p.iter().map(|(_, p, _)| p.as_str()).collect()
    }

    #[test]
    fn discovery_needs_an_issuer_and_no_jwks_url() {
        let p = problems(
            "mode: enforce\nalgorithms: [ES256]\ndiscovery: true\n",
            "jwt",
        );
        assert_eq!(paths(&p), vec!["jwt.discovery"]);
        assert!(p[0].2.contains("needs issuer"), "{p:?}");
        let p = problems(
            "mode: enforce\nalgorithms: [ES256]\ndiscovery: true\nissuer: https://idp.example\njwks_url: https://idp.example/jwks\n",
            "jwt",
        );
        assert_eq!(paths(&p), vec!["jwt.discovery"]);
        let p = problems(
            "mode: enforce\nalgorithms: [ES256]\ndiscovery: true\nissuer: http://idp.example\n",
            "jwt",
        );
        assert_eq!(paths(&p), vec!["jwt.issuer"]);
        assert!(p[0].2.contains("https://"), "{p:?}");
        let j = build(
            &config("mode: enforce\nalgorithms: [ES256]\ndiscovery: true\nissuer: https://idp.example/realms/a/\n"),
            "jwt",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            j.discovery_url.as_deref(),
            Some("https://idp.example/realms/a/.well-known/openid-configuration")
        );
        assert!(j.jwks_cache_key().is_some());
        let off = build(
            &config("mode: enforce\nalgorithms: [ES256]\ndiscovery: false\njwks_url: https://idp.example/j\n"),
            "jwt",
        )
        .unwrap()
        .unwrap();
        assert_eq!(off.discovery_url, None);
    }

    #[test]
    fn off_builds_nothing() {
        assert!(build(&config("mode: off\nalgorithms: [none]\n"), "jwt")
            .unwrap()
            .is_none());
        assert!(build(&config("{}"), "jwt").unwrap().is_none());
    }

    #[test]
    fn a_full_policy_builds() {
        let secret = temp_file("full-secret", &format!("{SECRET}\r\n"));
        let yaml = format!(
            "mode: report
algorithms: [RS256, PS256, HS256, ES256]
keys:
  - {{ kid: r1, file: \"{}\" }}
  - {{ kid: h1, secret_file: \"{secret}\" }}
jwks_url: https://idp.example/.well-known/jwks.json
jwks_refresh: 5m
issuer: https://idp.example
audience: [ws]
leeway: 10s
required_claims: [exp, sub]
token_sources: [header, \"query:access_token\", \"cookie:session\", \"subprotocol:bearer.\"]
forward_claims: {{ sub: X-Auth-Subject, roles: x-auth-roles }}
close_on_expiry: false
forward_token: true
",
            fixture("rsa_public.pem")
        );
        let j = build(&config(&yaml), "jwt").unwrap().unwrap();
        assert_eq!(j.mode, Mode::Report);
        assert_eq!(
            j.algorithms,
            [
                Algorithm::RS256,
                Algorithm::PS256,
                Algorithm::HS256,
                Algorithm::ES256
            ]
        );
        assert_eq!(j.keys.len(), 2);
        assert_eq!(j.keys[0].algorithms, [Algorithm::RS256, Algorithm::PS256]);
        assert_eq!(j.keys[1].algorithms, [Algorithm::HS256]);
        // The trailing newline of the secret file is not part of the secret.
        assert_eq!(j.keys[1].key.try_get_as_bytes().unwrap(), SECRET.as_bytes());
        assert_eq!(
            j.jwks_url.as_deref(),
            Some("https://idp.example/.well-known/jwks.json")
        );
        assert_eq!(j.jwks_refresh, Duration::from_secs(300));
        assert_eq!(j.issuer.as_deref(), Some("https://idp.example"));
        assert_eq!(j.audience, ["ws"]);
        assert_eq!(j.leeway, Duration::from_secs(10));
        assert_eq!(j.required_claims, ["exp", "sub"]);
        assert_eq!(
            j.token_sources,
            [
                TokenSource::Header,
                TokenSource::Query("access_token".into()),
                TokenSource::Cookie("session".into()),
                TokenSource::Subprotocol("bearer.".into())
            ]
        );
        let fc: Vec<(&str, &str)> = j
            .forward_claims
            .iter()
            .map(|(c, h)| (c.as_str(), h.as_str()))
            .collect();
        assert_eq!(fc, [("roles", "x-auth-roles"), ("sub", "x-auth-subject")]);
        assert!(!j.close_on_expiry && j.forward_token);
    }

    #[test]
    fn defaults_apply() {
        let yaml = format!(
            "mode: enforce\nkeys: [{{file: \"{}\"}}]\n",
            fixture("rsa_public.pem")
        );
        let j = build(&config(&yaml), "jwt").unwrap().unwrap();
        assert_eq!(j.mode, Mode::Enforce);
        assert_eq!(j.algorithms, [Algorithm::RS256]);
        assert_eq!(j.jwks_url, None);
        assert_eq!(j.jwks_refresh, Duration::from_secs(600));
        assert_eq!(j.leeway, Duration::from_secs(30));
        assert_eq!(j.required_claims, ["exp"]);
        assert_eq!(j.token_sources, [TokenSource::Header]);
        assert!(j.forward_claims.is_empty() && j.audience.is_empty() && j.issuer.is_none());
        assert!(j.close_on_expiry && !j.forward_token);
        // A localhost JWKS over http; HS secrets from the environment (tests
        // do not set variables: the process environment is shared).
        let yaml = "mode: enforce\nalgorithms: [ES256]\njwks_url: http://localhost:8089/jwks\n";
        let j = build(&config(yaml), "jwt").unwrap().unwrap();
        assert_eq!(j.jwks_url.as_deref(), Some("http://localhost:8089/jwks"));
        let unset = format!("WSGUARD_JWT_TEST_UNSET_{}", std::process::id());
        let p = problems(
            &format!("mode: enforce\nalgorithms: [HS256]\nkeys: [{{secret_env: {unset}}}]\n"),
            "jwt",
        );
        assert_eq!(paths(&p), ["jwt.keys[0].secret_env"]);
        assert!(p[0].2.contains("is not set"), "{p:?}");
        if let Ok(path) = std::env::var("PATH") {
            if path.len() >= 64 {
                let yaml =
                    "mode: enforce\nalgorithms: [HS256, HS512]\nkeys: [{secret_env: PATH}]\n";
                let j = build(&config(yaml), "jwt").unwrap().unwrap();
                assert_eq!(j.keys[0].algorithms, [Algorithm::HS256, Algorithm::HS512]);
                assert_eq!(j.keys[0].key.try_get_as_bytes().unwrap(), path.as_bytes());
            }
        }
        // 42 bytes: enough for HS256, too short for HS512.
        let secret = temp_file("hs512-secret", SECRET);
        let yaml = format!(
            "mode: enforce\nalgorithms: [HS256, HS512]\nkeys: [{{secret_file: \"{secret}\"}}]\n"
        );
        let j = build(&config(&yaml), "jwt").unwrap().unwrap();
        assert_eq!(j.keys[0].algorithms, [Algorithm::HS256]);
    }

    #[test]
    fn bad_policies_name_every_problem() {
        let short = temp_file("short-secret", "too short\n");
        let yaml = format!(
            "mode: enforce
algorithms: [RS256, none, XS256, HS256]
keys:
  - {{ file: \"{rsa}\", secret_env: X }}
  - {{ secret_file: \"{short}\" }}
  - {{ file: \"{rsa_priv}\" }}
  - {{ file: \"{ec}\" }}
  - {{ kid: k }}
  - {{ secret_file: /nonexistent/secret }}
  - {{ file: /nonexistent/key.pem }}
jwks_url: http://idp.example/jwks
jwks_refresh: 10 minutes
leeway: 2h
token_sources: [\"query:\", bogus, header, header, \"cookie:a;b\"]
forward_claims: {{ sub: x-forwarded-for, role: \"bad header\", tenant: Sec-WebSocket-Protocol, a: x-one, b: X-One, c: connection }}
",
            rsa = fixture("rsa_public.pem"),
            rsa_priv = fixture("rsa_private.pem"),
            ec = fixture("ec1_public.pem"),
        );
        let p = problems(&yaml, "routes[0].jwt");
        let expect = [
            (2, "routes[0].jwt.algorithms[1]", "`none` is never accepted"),
            (
                2,
                "routes[0].jwt.algorithms[2]",
                "unknown algorithm `XS256`",
            ),
            (
                4,
                "routes[0].jwt.keys[0]",
                "exactly one of file, secret_env or secret_file",
            ),
            (5, "routes[0].jwt.keys[1].secret_file", "at least 32"),
            (6, "routes[0].jwt.keys[2].file", "private key"),
            (7, "routes[0].jwt.keys[3].file", "ES256"),
            (
                8,
                "routes[0].jwt.keys[4]",
                "one of file, secret_env or secret_file is required",
            ),
            (9, "routes[0].jwt.keys[5].secret_file", "cannot read"),
            (10, "routes[0].jwt.keys[6].file", "cannot read"),
            (11, "routes[0].jwt.jwks_url", "https://"),
            (12, "routes[0].jwt.jwks_refresh", "not a duration"),
            (13, "routes[0].jwt.leeway", "at most 1h"),
            (14, "routes[0].jwt.token_sources[0]", "empty"),
            (14, "routes[0].jwt.token_sources[1]", "not a token source"),
            (14, "routes[0].jwt.token_sources[3]", "duplicate"),
            (
                14,
                "routes[0].jwt.token_sources[4]",
                "not a valid cookie name",
            ),
            (15, "routes[0].jwt.forward_claims.sub", "wsguard sets it"),
            (
                15,
                "routes[0].jwt.forward_claims.role",
                "not a valid header name",
            ),
            (15, "routes[0].jwt.forward_claims.tenant", "wsguard sets it"),
            (15, "routes[0].jwt.forward_claims.b", "already used"),
            (15, "routes[0].jwt.forward_claims.c", "hop-by-hop"),
        ];
        for (line, path, msg) in expect {
            assert!(
                p.iter()
                    .any(|(l, pp, m)| *l == line && pp == path && m.contains(msg)),
                "missing {line} {path} {msg:?} in\n{p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn structural_key_problems() {
        // No key and no JWKS.
        let p = problems("mode: enforce\n", "jwt");
        assert_eq!(paths(&p), ["jwt.keys"]);
        assert_eq!(p[0].0, 1);
        let p = problems("mode: enforce\nkeys: []\n", "jwt");
        assert_eq!(paths(&p), ["jwt.keys"]);
        // An HS secret needs an HS algorithm.
        let secret = temp_file("nohs-secret", SECRET);
        let p = problems(
            &format!("mode: enforce\nkeys: [{{secret_file: \"{secret}\"}}]\n"),
            "jwt",
        );
        assert_eq!(paths(&p), ["jwt.keys[0].secret_file"]);
        assert!(p[0].2.contains("HS algorithm"), "{p:?}");
        // HS512 alone needs 64 bytes.
        let p = problems(
            &format!("mode: enforce\nalgorithms: [HS512]\nkeys: [{{secret_file: \"{secret}\"}}]\n"),
            "jwt",
        );
        assert!(p[0].2.contains("at least 64"), "{p:?}");
        // A JWKS is useless with HS algorithms only.
        let p = problems(
            "mode: enforce\nalgorithms: [HS256]\njwks_url: https://idp.example/jwks\n",
            "jwt",
        );
        assert_eq!(paths(&p), ["jwt.jwks_url"]);
        // Empty lists and duplicate kids.
        let p = problems(
            "mode: enforce\nalgorithms: []\ntoken_sources: []\njwks_url: https://i.example/j\n",
            "jwt",
        );
        assert_eq!(paths(&p), ["jwt.algorithms", "jwt.token_sources"]);
        let rsa = fixture("rsa_public.pem");
        let p = problems(
            &format!(
                "mode: enforce\nkeys: [{{kid: a, file: \"{rsa}\"}}, {{kid: a, file: \"{rsa}\"}}]\n"
            ),
            "jwt",
        );
        assert_eq!(paths(&p), ["jwt.keys[1].kid"]);
        // Credentials in the JWKS URL, other schemes.
        for url in [
            "https://user:pw@idp.example/j",
            "ftp://idp.example/j",
            "not a url",
            "http://10.0.0.1/j",
        ] {
            let p = problems(&format!("mode: enforce\njwks_url: \"{url}\"\n"), "jwt");
            assert_eq!(paths(&p), ["jwt.jwks_url"], "{url}");
        }
        for url in [
            "http://127.0.0.1:9/j",
            "http://[::1]:9/j",
            "https://idp.example/j",
        ] {
            assert!(
                build(
                    &config(&format!("mode: enforce\njwks_url: \"{url}\"\n")),
                    "jwt"
                )
                .is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn pem_parsing() {
        assert!(pem_key(b"hello").unwrap_err().contains("not a PEM"));
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(pem_key(cert.as_bytes())
            .unwrap_err()
            .contains("CERTIFICATE"));
        assert!(pem_key(EC1_PRIV.as_bytes())
            .unwrap_err()
            .contains("private key"));
        let (_, algs) = pem_key(RSA_PUB.as_bytes()).unwrap();
        assert_eq!(algs, AlgorithmFamily::Rsa.algorithms());
        let (_, algs) = pem_key(EC1_PUB.as_bytes()).unwrap();
        assert_eq!(algs, [Algorithm::ES256]);
        // The DER walker measures the modulus.
        let k = DecodingKey::from_rsa_pem(RSA_PUB.as_bytes()).unwrap();
        assert_eq!(
            rsa_der_modulus_bits(k.try_get_as_bytes().unwrap()),
            Some(2048)
        );
        assert_eq!(rsa_der_modulus_bits(&[0x30, 0x03, 0x02, 0x01]), None);
        assert_eq!(rsa_der_modulus_bits(&[]), None);
        assert_eq!(bit_len(&[0, 0, 1, 0]), 9);
        assert_eq!(bit_len(&[0x80]), 8);
        assert_eq!(bit_len(&[]), 0);
    }
}
