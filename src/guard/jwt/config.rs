//! The `jwt` policy section: validation at load ([`build`]) into the typed
//! [`Jwt`] policy. Keys are parsed here, once, never per request.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::HeaderName;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_saphyr::Location;

use super::extract::TokenSource;
use super::jwks::JwksCache;
use super::keys::{read_pem_key, StaticKey};
use super::verify::{exp_of, Claims};
use crate::config::{JwtConfig, JwtKeyConfig, Mode, Str};
use crate::values::parse_duration;

/// RFC 7518 section 3.2: HS256 needs a key of at least 256 bits.
const MIN_HS_SECRET: usize = 32;
/// A leeway above this would make `exp` meaningless.
pub(super) const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Every algorithm that can be pinned.
pub(super) const SUPPORTED: [Algorithm; 12] = [
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
                if algs_known {
                    b.jwks_needs_public_algorithms(&algorithms, u.referenced, "jwks_url");
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
                    if algs_known {
                        b.jwks_needs_public_algorithms(&algorithms, d.referenced, "discovery");
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

    let token_sources = b.token_sources(&cfg.token_sources, mode_loc);

    let forward_claims = b.forward_claims(&cfg.forward_claims);

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

/// Collects the problems of one token guard's section (`jwt` here,
/// `introspection` too), each under the section's key path.
pub(crate) struct Builder<'a> {
    pub(crate) path: &'a str,
    pub(crate) problems: Vec<Problem>,
}

impl Builder<'_> {
    pub(crate) fn push(&mut self, loc: Location, sub: &str, message: impl Into<String>) {
        let p = if sub.is_empty() {
            self.path.to_string()
        } else {
            format!("{}.{sub}", self.path)
        };
        self.problems.push((loc, p, message.into()));
    }

    /// A JWKS (named or discovered) only provides public keys: refused when
    /// only HS algorithms are pinned.
    fn jwks_needs_public_algorithms(&mut self, pinned: &[Algorithm], loc: Location, sub: &str) {
        if pinned.iter().all(|a| a.family() == AlgorithmFamily::Hmac) {
            self.push(
                loc,
                sub,
                "a JWKS only provides public keys (HS secrets are never taken from it), \
                 but only HS algorithms are pinned",
            );
        }
    }

    pub(crate) fn duration(&mut self, v: &Option<Str>, sub: &str, default: Duration) -> Duration {
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

    /// `token_sources`: the header by default; at least one, no repeats.
    pub(crate) fn token_sources(
        &mut self,
        list: &Option<Vec<Str>>,
        mode_loc: Location,
    ) -> Vec<TokenSource> {
        let mut token_sources: Vec<TokenSource> = Vec::new();
        let Some(list) = list else {
            token_sources.push(TokenSource::Header);
            return token_sources;
        };
        if list.is_empty() {
            self.push(
                mode_loc,
                "token_sources",
                "at least one token source is required",
            );
        }
        for (i, s) in list.iter().enumerate() {
            let sp = format!("token_sources[{i}]");
            match TokenSource::parse(&s.value) {
                Ok(t) if token_sources.contains(&t) => {
                    self.push(s.referenced, &sp, format!("duplicate token source `{t}`"));
                }
                Ok(t) => token_sources.push(t),
                Err(m) => self.push(s.referenced, &sp, m),
            }
        }
        token_sources
    }

    /// `forward_claims`: claim name to header, each header used once and
    /// allowed by [`forward_header`].
    pub(crate) fn forward_claims(
        &mut self,
        map: &Option<std::collections::BTreeMap<String, Str>>,
    ) -> Vec<(String, HeaderName)> {
        let mut forward_claims: Vec<(String, HeaderName)> = Vec::new();
        for (claim, header) in map.iter().flatten() {
            let cp = format!("forward_claims.{claim}");
            if claim.is_empty() {
                self.push(header.referenced, &cp, "the claim name must not be empty");
                continue;
            }
            match forward_header(&header.value) {
                Ok(name) if forward_claims.iter().any(|(_, h)| *h == name) => self.push(
                    header.referenced,
                    &cp,
                    format!("header `{name}` is already used by another claim"),
                ),
                Ok(name) => forward_claims.push((claim.clone(), name)),
                Err(m) => self.push(header.referenced, &cp, m),
            }
        }
        forward_claims
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

pub(super) fn names(algs: &[Algorithm]) -> String {
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

pub(super) fn check_jwks_url(s: &str) -> Result<(), String> {
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

pub fn forward_header(s: &str) -> Result<HeaderName, String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::guard::jwt::test_support::*;

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
}
