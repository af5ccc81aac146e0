//! Token verification: the JOSE header is checked against the pinned
//! algorithms before any key is tried, then each candidate key in turn.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Weak};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::header::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use tokio_util::sync::CancellationToken;

use super::config::{Jwt, MAX_LEEWAY};
use super::jwks::{JwksCache, JWKS_START_TIMEOUT};
use super::keys::StaticKey;

/// A token longer than this is refused without parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;

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
    /// of that URL ([`crate::state::Process`] keeps one per URL across
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
    pub(super) fn with_refetch_interval(
        jwt: Arc<Jwt>,
        refetch_every: std::time::Duration,
    ) -> Verifier {
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
    use crate::guard::jwt::test_support::*;
    use jsonwebtoken::jwk::Jwk;
    use std::time::Duration;

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
}
