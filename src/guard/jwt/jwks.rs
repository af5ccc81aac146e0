//! The JWKS client: one [`JwksCache`] per URL (or discovery document),
//! fetched at start, refreshed in the background, refetched on an unknown
//! kid; a failed fetch keeps the last good keys.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{check_jwks_url, names, SUPPORTED};
use super::keys::{bit_len, check_rsa_bits, StaticKey};

/// An unknown kid triggers at most one JWKS refetch per this interval
/// (one global throttle, not per kid: kids are attacker-chosen).
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// Per-request timeout of a JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on the initial fetch awaited by [`Verifier::start`].
pub(super) const JWKS_START_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused.
const JWKS_MAX_BYTES: usize = 256 * 1024;
/// At most this many usable keys are taken from one JWKS document.
const JWKS_MAX_KEYS: usize = 64;

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

    pub(super) fn with_refetch_interval(url: &str, refetch_every: Duration) -> Arc<JwksCache> {
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
    pub(super) async fn refetch_for_unknown_key(&self) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::guard::jwt::test_support::*;

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
}
