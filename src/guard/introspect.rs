//! OAuth 2.0 token introspection (RFC 7662), for opaque access tokens.
//!
//! At the upgrade, the token (found in the configured sources, as for a
//! JWT) is POSTed as `token=...` to the introspection endpoint with
//! wsguard's client credentials in HTTP Basic. The answer's `active`, `exp`,
//! `nbf`, `iss` and `aud` decide; the answer itself then plays the part of
//! a JWT's claims (`sub` for per-subject limits, `forward_claims`,
//! `hmac.bind_claim`, derived keys, `close_on_expiry`).
//!
//! Design constraints, and why:
//! * Answers are cached under a keyed hash of the token, never the token:
//!   a heap dump of wsguard does not hand out bearer tokens. An active
//!   answer lives at most `cache_ttl` and never past its `exp`; an inactive
//!   one lives `inactive_cache_ttl`, so a flood of bad tokens does not
//!   become a flood of calls, while a token activated later is not locked
//!   out for long. The cache is capped in entries.
//! * Calls for the same token are coalesced: a reconnect storm of a
//!   thousand clients with one token makes one call.
//! * `timeout` bounds the call, and the handshake's own deadline bounds
//!   every waiter: a slow identity provider cannot hold handshakes open.
//! * The client secret is turned into the Basic header once, at load, and
//!   that header is marked sensitive; nothing that is logged or returned
//!   as an error contains it.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use hyper::header::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_saphyr::Location;
use sha2::Sha256;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::config::{IntrospectionConfig, IntrospectionOnError, Mode};
use crate::guard::jwt::{self, Builder, Claims, Problem, TokenSource};
use crate::metrics::ResultLabel;

type HmacSha256 = Hmac<Sha256>;

/// Largest introspection answer read (a normal one is a few hundred bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Validated introspection policy (built at load).
#[derive(Clone)]
pub struct Introspection {
    /// Enforce or Report (Off => no `Introspection` at all).
    pub mode: Mode,
    /// `https://`, or `http://` to a loopback address only.
    pub url: reqwest::Url,
    pub client_id: String,
    /// `Basic base64(urlencode(id):urlencode(secret))`, marked sensitive.
    authorization: HeaderValue,
    pub token_sources: Vec<TokenSource>,
    /// Zero: answers are not cached (calls are still coalesced).
    pub cache_ttl: Duration,
    pub inactive_cache_ttl: Duration,
    pub cache_max_entries: usize,
    pub timeout: Duration,
    pub on_error: IntrospectionOnError,
    pub forward_claims: Vec<(String, HeaderName)>,
    pub close_on_expiry: bool,
    pub forward_token: bool,
    pub issuer: Option<String>,
    /// Empty means `aud` is not checked.
    pub audience: Vec<String>,
    pub leeway: Duration,
}

impl fmt::Debug for Introspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The credentials are deliberately left out.
        f.debug_struct("Introspection")
            .field("mode", &self.mode)
            .field("url", &self.url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("cache_ttl", &self.cache_ttl)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl Introspection {
    /// When a live session authenticated by `claims` must be closed: the
    /// answer's `exp` plus the leeway. None without a numeric `exp`.
    pub fn session_deadline(&self, claims: &Claims) -> Option<SystemTime> {
        let exp = jwt::exp_of(claims)?;
        UNIX_EPOCH.checked_add(Duration::from_secs(
            exp.saturating_add(self.leeway.as_secs()),
        ))
    }
}

/// Why an introspected token was refused (or could not be checked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntrospectError {
    #[error("no token")]
    Missing,
    #[error("token inactive or unknown")]
    Inactive,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong token issuer")]
    WrongIssuer,
    #[error("wrong token audience")]
    WrongAudience,
    /// The endpoint could not be reached, passed `timeout`, or answered
    /// anything but 200 with a JSON object. Never carries a credential.
    #[error("introspection endpoint unavailable: {0}")]
    Unavailable(String),
}

impl IntrospectError {
    /// Stable snake_case label (for `wsguard_rejections_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            IntrospectError::Missing => "introspection_missing",
            IntrospectError::Inactive => "introspection_inactive",
            IntrospectError::Expired => "introspection_expired",
            IntrospectError::NotYetValid => "introspection_not_yet_valid",
            IntrospectError::WrongIssuer => "introspection_wrong_issuer",
            IntrospectError::WrongAudience => "introspection_wrong_audience",
            IntrospectError::Unavailable(_) => "introspection_unavailable",
        }
    }

    /// `WWW-Authenticate` for the 401 (RFC 6750 section 3).
    pub fn www_authenticate(&self) -> &'static str {
        if matches!(self, IntrospectError::Missing) {
            "Bearer"
        } else {
            "Bearer error=\"invalid_token\""
        }
    }
}

// ---------------------------------------------------------------- building

/// `https://`, or `http://` to a loopback address; no credentials in it.
pub fn check_url(s: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "credentials must not be written in the URL (use client_id and client_secret_env)"
                .into(),
        );
    }
    if url.fragment().is_some() {
        return Err(format!("`{s}`: a URL fragment is not allowed"));
    }
    let Some(host) = url.host_str() else {
        return Err(format!("`{s}` has no host"));
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        "http" => Err(format!(
            "`{s}`: tokens and credentials must travel over https:// (plain http:// only to a loopback address)"
        )),
        other => Err(format!("`{s}`: unsupported scheme `{other}` (use https://)")),
    }
}

/// Validates an `introspection` section. `path` is its key path
/// (`introspection` or `routes[i].introspection`). Ok(None) when off.
pub fn build(cfg: &IntrospectionConfig, path: &str) -> Result<Option<Introspection>, Vec<Problem>> {
    let (mode, mode_loc) = cfg
        .mode
        .as_ref()
        .map_or((Mode::Off, Location::UNKNOWN), |m| (m.value, m.referenced));
    if mode == Mode::Off {
        return Ok(None);
    }
    let mut b = Builder {
        path,
        problems: Vec::new(),
    };
    let url = match &cfg.url {
        None => {
            b.push(
                mode_loc,
                "url",
                "required when introspection.mode is not off",
            );
            None
        }
        Some(u) => check_url(&u.value)
            .map_err(|e| b.push(u.referenced, "url", e))
            .ok(),
    };
    let client_id = match &cfg.client_id {
        Some(id) if !id.value.is_empty() && !id.value.chars().any(char::is_control) => {
            Some(id.value.clone())
        }
        Some(id) => {
            b.push(
                id.referenced,
                "client_id",
                "must be a non-empty printable string",
            );
            None
        }
        None => {
            b.push(
                mode_loc,
                "client_id",
                "required when introspection.mode is not off",
            );
            None
        }
    };
    let secret = match (&cfg.client_secret_env, &cfg.client_secret_file) {
        (Some(env), None) => match std::env::var(&env.value) {
            Ok(v) => Some(v),
            Err(_) => {
                b.push(
                    env.referenced,
                    "client_secret_env",
                    format!("environment variable `{}` is not set", env.value),
                );
                None
            }
        },
        (None, Some(file)) => match crate::files::read_text(std::path::Path::new(&file.value)) {
            Ok(v) => Some(v),
            Err(e) => {
                b.push(
                    file.referenced,
                    "client_secret_file",
                    format!("cannot read `{}`: {e}", file.value),
                );
                None
            }
        },
        (Some(env), Some(_)) => {
            b.push(
                env.referenced,
                "client_secret_env",
                "set one of client_secret_env or client_secret_file, not both",
            );
            None
        }
        (None, None) => {
            b.push(
                mode_loc,
                "client_secret_env",
                "required when introspection.mode is not off",
            );
            None
        }
    };
    // A file ends with a newline that is not part of the secret.
    let secret = secret.map(|s| s.trim_end_matches(['\r', '\n']).to_string());
    if secret.as_ref().is_some_and(String::is_empty) {
        let loc = cfg
            .client_secret_env
            .as_ref()
            .or(cfg.client_secret_file.as_ref())
            .map_or(mode_loc, |s| s.referenced);
        b.push(loc, "client_secret_env", "the client secret is empty");
    }
    let authorization = match (&client_id, &secret) {
        (Some(id), Some(secret)) if !secret.is_empty() => {
            // RFC 6749 section 2.3.1: both parts form-urlencoded first.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let raw = format!("{}:{}", enc(id), enc(secret));
            let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
            match HeaderValue::from_str(&format!("Basic {b64}")) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    Some(v)
                }
                Err(_) => None,
            }
        }
        _ => None,
    };

    let cache_ttl = b.duration(&cfg.cache_ttl, "cache_ttl", Duration::from_secs(60));
    let inactive_cache_ttl = b.duration(
        &cfg.inactive_cache_ttl,
        "inactive_cache_ttl",
        Duration::from_secs(5),
    );
    let cache_max_entries = cfg.cache_max_entries.as_ref().map_or(10_000, |v| v.value);
    if let Some(v) = cfg.cache_max_entries.as_ref().filter(|v| v.value == 0) {
        b.push(
            v.referenced,
            "cache_max_entries",
            "must be at least 1 (use cache_ttl: 0s to turn the cache off)",
        );
    }
    let timeout = b.duration(&cfg.timeout, "timeout", Duration::from_secs(1));
    if timeout.is_zero() {
        let loc = cfg.timeout.as_ref().map_or(mode_loc, |t| t.referenced);
        b.push(loc, "timeout", "must be above zero");
    }
    let leeway = b.duration(&cfg.leeway, "leeway", Duration::ZERO);

    let issuer = match &cfg.issuer {
        Some(i) if i.value.is_empty() => {
            b.push(
                i.referenced,
                "issuer",
                "must not be empty (omit it to skip the check)",
            );
            None
        }
        other => other.as_ref().map(|i| i.value.clone()),
    };
    let mut audience: Vec<String> = Vec::new();
    for (i, a) in cfg.audience.iter().flatten().enumerate() {
        if a.value.is_empty() {
            b.push(a.referenced, &format!("audience[{i}]"), "must not be empty");
        } else if !audience.contains(&a.value) {
            audience.push(a.value.clone());
        }
    }

    let token_sources = b.token_sources(&cfg.token_sources, mode_loc);
    let forward_claims = b.forward_claims(&cfg.forward_claims);

    if !b.problems.is_empty() {
        return Err(b.problems);
    }
    let (Some(url), Some(client_id), Some(authorization)) = (url, client_id, authorization) else {
        return Err(vec![(
            mode_loc,
            path.to_string(),
            "incomplete introspection settings".to_string(),
        )]);
    };
    Ok(Some(Introspection {
        mode,
        url,
        client_id,
        authorization,
        token_sources,
        cache_ttl,
        inactive_cache_ttl,
        cache_max_entries: usize::try_from(cache_max_entries).unwrap_or(usize::MAX),
        timeout,
        on_error: cfg.on_error.unwrap_or_default(),
        forward_claims,
        close_on_expiry: cfg.close_on_expiry.unwrap_or(true),
        forward_token: cfg.forward_token.unwrap_or(false),
        issuer,
        audience,
        leeway,
    }))
}

// ---------------------------------------------------------------- runtime

/// What the endpoint said about one token.
#[derive(Debug)]
enum Answer {
    Inactive,
    Active(Claims),
}

struct Cached {
    answer: Arc<Answer>,
    until: Instant,
}

type Outcome = Result<Arc<Answer>, String>;
type TokenHash = [u8; 32];

/// Counters shared with the metrics registry.
#[derive(Clone, Default)]
pub struct IntrospectionMetrics {
    /// `result`: hit, miss, coalesced.
    pub cache: Family<ResultLabel, Counter>,
    /// `result`: active, inactive, error.
    pub requests: Family<ResultLabel, Counter>,
}

impl IntrospectionMetrics {
    fn cache(&self, result: &'static str) {
        self.cache.get_or_create(&ResultLabel { result }).inc();
    }
    fn request(&self, result: &'static str) {
        self.requests.get_or_create(&ResultLabel { result }).inc();
    }
}

/// The introspection client of one route: HTTP client, answer cache and
/// in-flight calls.
pub struct Introspector {
    policy: Arc<Introspection>,
    client: Option<reqwest::Client>,
    /// Random per introspector: the cache key is HMAC(this, token).
    hash_key: HmacSha256,
    cache: Mutex<HashMap<TokenHash, Cached>>,
    inflight: Mutex<HashMap<TokenHash, Arc<OnceCell<Outcome>>>>,
    calls: AtomicU64,
    metrics: IntrospectionMetrics,
}

impl fmt::Debug for Introspector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introspector")
            .field("policy", &self.policy)
            .finish()
    }
}

/// Removes an in-flight entry when its last waiter leaves (done or
/// cancelled), so abandoned calls cannot pile up.
struct InflightGuard<'a> {
    map: &'a Mutex<HashMap<TokenHash, Arc<OnceCell<Outcome>>>>,
    key: TokenHash,
    cell: Arc<OnceCell<Outcome>>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        let ours = map
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // Done: the answer is in the cache (or was an error). Abandoned:
        // only the map and this guard hold the cell.
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) <= 2) {
            map.remove(&self.key);
        }
    }
}

impl Introspector {
    pub fn new(policy: Arc<Introspection>, metrics: IntrospectionMetrics) -> Introspector {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout)
            .build()
            .map_err(|e| tracing::error!(error = %e, "cannot build the introspection HTTP client"))
            .ok();
        let mut seed = [0u8; 64];
        rand::fill(&mut seed);
        let hash_key = HmacSha256::new(&seed.into());
        Introspector {
            policy,
            client,
            hash_key,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn policy(&self) -> &Arc<Introspection> {
        &self.policy
    }

    /// Calls made to the endpoint so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Answers currently cached.
    pub fn cached_entries(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    fn hash(&self, token: &str) -> TokenHash {
        let mut mac = self.hash_key.clone();
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn cached(&self, key: &TokenHash, now: Instant) -> Option<Arc<Answer>> {
        let mut cache = self.cache.lock().ok()?;
        match cache.get(key) {
            Some(c) if c.until > now => Some(Arc::clone(&c.answer)),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn store(&self, key: TokenHash, answer: &Arc<Answer>) {
        let now = Instant::now();
        let ttl = match answer.as_ref() {
            Answer::Inactive => self.policy.inactive_cache_ttl,
            Answer::Active(claims) => {
                let left = jwt::exp_of(claims).map_or(Duration::MAX, |exp| {
                    UNIX_EPOCH
                        .checked_add(Duration::from_secs(exp))
                        .and_then(|at| at.duration_since(SystemTime::now()).ok())
                        .unwrap_or(Duration::ZERO)
                });
                self.policy.cache_ttl.min(left)
            }
        };
        if ttl.is_zero() {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= self.policy.cache_max_entries && !cache.contains_key(&key) {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= self.policy.cache_max_entries {
                // Full of live answers: drop the one closest to expiry.
                if let Some(k) = cache.iter().min_by_key(|(_, c)| c.until).map(|(k, _)| *k) {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            Cached {
                answer: Arc::clone(answer),
                until: now + ttl,
            },
        );
    }

    /// Checks a token (None: no token was found) and returns the answer as
    /// claims. `deadline` is the handshake's: no waiter outlives it.
    pub async fn check(
        &self,
        token: Option<&str>,
        deadline: Instant,
    ) -> Result<Claims, IntrospectError> {
        let token = token.ok_or(IntrospectError::Missing)?;
        let key = self.hash(token);
        let now = Instant::now();
        if let Some(answer) = self.cached(&key, now) {
            self.metrics.cache("hit");
            return self.judge(&answer);
        }
        let cell = {
            let mut inflight = self
                .inflight
                .lock()
                .map_err(|_| IntrospectError::Unavailable("internal lock poisoned".into()))?;
            let cell = inflight.entry(key).or_default();
            let joined = cell.initialized() || Arc::strong_count(cell) > 1;
            self.metrics
                .cache(if joined { "coalesced" } else { "miss" });
            Arc::clone(cell)
        };
        let guard = InflightGuard {
            map: &self.inflight,
            key,
            cell,
        };
        let until = deadline.min(now + self.policy.timeout);
        let outcome = tokio::time::timeout_at(
            until,
            guard.cell.get_or_init(|| async {
                let outcome = self.call(token).await.map(Arc::new);
                match &outcome {
                    Ok(answer) => {
                        self.metrics.request(match answer.as_ref() {
                            Answer::Active(_) => "active",
                            Answer::Inactive => "inactive",
                        });
                        self.store(key, answer);
                    }
                    Err(_) => self.metrics.request("error"),
                }
                outcome
            }),
        )
        .await;
        let answer = match outcome {
            Ok(Ok(answer)) => Arc::clone(answer),
            Ok(Err(e)) => return Err(IntrospectError::Unavailable(e.clone())),
            Err(_) => return Err(IntrospectError::Unavailable("timed out".into())),
        };
        drop(guard);
        self.judge(&answer)
    }

    /// One call to the endpoint. Errors never contain the token or the
    /// credentials (the URL carries neither).
    async fn call(&self, token: &str) -> Result<Answer, String> {
        let client = self.client.as_ref().ok_or("no HTTP client")?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let mut resp = client
            .post(self.policy.url.clone())
            .header(
                reqwest::header::AUTHORIZATION,
                self.policy.authorization.clone(),
            )
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {}", without_url(&e)))?;
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            return Err(format!("answered {status}"));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
        {
            return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
        }
        let mut raw = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading failed: {}", without_url(&e)))?
        {
            if raw.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
            }
            raw.extend_from_slice(&chunk);
        }
        parse_answer(&raw)
    }

    /// Applies `active`, `exp`, `nbf`, `iss` and `aud` to an answer.
    fn judge(&self, answer: &Answer) -> Result<Claims, IntrospectError> {
        let Answer::Active(claims) = answer else {
            return Err(IntrospectError::Inactive);
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let leeway = self.policy.leeway.as_secs();
        if jwt::exp_of(claims).is_some_and(|exp| exp.saturating_add(leeway) <= now) {
            return Err(IntrospectError::Expired);
        }
        let nbf = claims.get("nbf").and_then(|v| {
            v.as_u64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f as u64)
            })
        });
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(IntrospectError::NotYetValid);
        }
        if let Some(iss) = &self.policy.issuer {
            if claims.get("iss").and_then(|v| v.as_str()) != Some(iss.as_str()) {
                return Err(IntrospectError::WrongIssuer);
            }
        }
        if !self.policy.audience.is_empty() {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => self.policy.audience.contains(a),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .filter_map(|v| v.as_str())
                    .any(|a| self.policy.audience.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(IntrospectError::WrongAudience);
            }
        }
        Ok(claims.clone())
    }
}

/// reqwest's error text without the URL (which could, in principle, carry
/// a query an operator considers private).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "transport error".to_string()
    };
    if let Some(src) = std::error::Error::source(e) {
        s.push_str(": ");
        s.push_str(&src.to_string());
    }
    s
}

/// An answer must be a JSON object. `active: true` (a boolean) is the only
/// way to be active: anything else, including a missing or mistyped
/// `active`, is inactive (RFC 7662 section 2.2).
fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|_| "answer is not JSON".to_string())?;
    let serde_json::Value::Object(map) = value else {
        return Err("answer is not a JSON object".into());
    };
    Ok(match map.get("active") {
        Some(serde_json::Value::Bool(true)) => Answer::Active(map),
        _ => Answer::Inactive,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_or_loopback() {
        for ok in [
            "https://idp.example/oauth2/introspect",
            "http://127.0.0.1:8080/introspect",
            "http://127.9.9.9/i",
            "http://localhost:1/i",
            "http://[::1]:9/i",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example/introspect",
            "http://10.0.0.1/i",
            "ftp://127.0.0.1/i",
            "https://user:pw@idp.example/i",
            "not a url",
            "https://idp.example/i#frag",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_active_only_with_boolean_true() {
        assert!(matches!(
            parse_answer(br#"{"active":true,"sub":"a"}"#),
            Ok(Answer::Active(_))
        ));
        for inactive in [
            &br#"{"active":false}"#[..],
            br#"{"active":"true"}"#,
            br#"{"active":1}"#,
            br#"{}"#,
        ] {
            assert!(matches!(parse_answer(inactive), Ok(Answer::Inactive)));
        }
        for bad in [&b"[]"[..], b"null", b"<html>", b""] {
            assert!(parse_answer(bad).is_err());
        }
    }

    fn policy(extra: &str) -> Introspection {
        // One file per call: tests run in parallel, and a shared file being
        // rewritten by one test reads as empty in another.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsguard-introspect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("secret-{n}"));
        std::fs::write(&f, "s3cr:et/é\n").unwrap();
        let yaml = format!(
            "mode: enforce\nurl: https://idp.example/introspect\nclient_id: \"wsg guard\"\nclient_secret_file: \"{}\"\n{extra}",
            f.display()
        );
        let cfg: IntrospectionConfig = serde_saphyr::from_str(&yaml).unwrap();
        build(&cfg, "introspection").unwrap().unwrap()
    }

    #[test]
    fn basic_credentials_are_form_encoded_and_never_printed() {
        let p = policy("");
        let b64 = p
            .authorization
            .to_str()
            .unwrap()
            .strip_prefix("Basic ")
            .unwrap()
            .to_string();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(raw, b"wsg+guard:s3cr%3Aet%2F%C3%A9");
        assert!(p.authorization.is_sensitive());
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("s3cr") && !dbg.contains("Basic"), "{dbg}");
    }

    #[test]
    fn judge_applies_exp_nbf_iss_aud() {
        let i = Introspector::new(
            Arc::new(policy("issuer: https://idp.example\naudience: [chat]\n")),
            IntrospectionMetrics::default(),
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let active = |v: serde_json::Value| match parse_answer(v.to_string().as_bytes()).unwrap() {
            a @ Answer::Active(_) => a,
            Answer::Inactive => panic!("inactive"),
        };
        let base = serde_json::json!({"active": true, "iss": "https://idp.example", "aud": ["x", "chat"], "exp": now + 60});
        assert!(i.judge(&active(base.clone())).is_ok());
        let with = |k: &str, v: serde_json::Value| {
            let mut b = base.clone();
            b[k] = v;
            active(b)
        };
        assert_eq!(
            i.judge(&with("exp", (now - 1).into())),
            Err(IntrospectError::Expired)
        );
        assert_eq!(
            i.judge(&with("nbf", (now + 100).into())),
            Err(IntrospectError::NotYetValid)
        );
        assert_eq!(
            i.judge(&with("iss", "https://evil.example".into())),
            Err(IntrospectError::WrongIssuer)
        );
        assert_eq!(
            i.judge(&with("aud", "other".into())),
            Err(IntrospectError::WrongAudience)
        );
        assert!(i.judge(&with("aud", "chat".into())).is_ok());
        assert_eq!(i.judge(&Answer::Inactive), Err(IntrospectError::Inactive));
    }

    #[test]
    fn cache_is_capped_and_keyed_by_a_hash() {
        let i = Introspector::new(
            Arc::new(policy("cache_max_entries: 3\n")),
            IntrospectionMetrics::default(),
        );
        let active = Arc::new(Answer::Active(serde_json::Map::new()));
        for t in ["a", "b", "c", "d", "e"] {
            i.store(i.hash(t), &active);
        }
        assert_eq!(i.cached_entries(), 3);
        assert!(i.cached(&i.hash("e"), Instant::now()).is_some());
        assert_ne!(i.hash("a"), i.hash("b"));
        // The key is not the token's plain SHA-256.
        use sha2::Digest as _;
        let plain: [u8; 32] = Sha256::digest(b"a").into();
        assert_ne!(i.hash("a"), plain);
    }

    #[test]
    fn build_reports_problems() {
        let cfg: IntrospectionConfig = serde_saphyr::from_str(
            "mode: enforce\nurl: http://idp.example/i\ntimeout: 0s\ncache_max_entries: 0\n",
        )
        .unwrap();
        let p = build(&cfg, "introspection").unwrap_err();
        let paths: Vec<&str> = p.iter().map(|(_, p, _)| p.as_str()).collect();
        for want in [
            "introspection.url",
            "introspection.client_id",
            "introspection.client_secret_env",
            "introspection.timeout",
            "introspection.cache_max_entries",
        ] {
            assert!(paths.contains(&want), "{want} in {paths:?}");
        }
        let off: IntrospectionConfig = serde_saphyr::from_str("mode: off\n").unwrap();
        assert!(build(&off, "introspection").unwrap().is_none());
    }
}
