//! The JWT guard, one file a job:
//! - `config`: the `jwt` policy section validated at load ([`build`] -> [`Jwt`]);
//! - `keys`: PEM public keys and the algorithms each may verify ([`StaticKey`]);
//! - `extract`: finding a token ([`extract`], [`find`]) and stripping every
//!   source before the request goes upstream ([`strip_sources`]);
//! - `verify`: the [`Verifier`];
//! - `jwks`: the JWKS client ([`JwksCache`]).
//!
//! Security rules, all enforced here and covered by the tests of each part:
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

mod config;
mod extract;
mod jwks;
mod keys;
mod verify;

pub(crate) use config::Builder;
pub use config::{build, forward_header, Jwt, Problem};
pub use extract::{
    extract, find, strip_cookie, strip_header, strip_query, strip_sources, strip_subprotocol,
    Ambiguous, Found, TokenSource,
};
pub use jwks::{JwksCache, UNKNOWN_KID_REFETCH};
pub use keys::StaticKey;
pub use verify::{claim_header_value, exp_of, Claims, JwtError, Verifier};

/// Fixtures and a JWKS server shared by the tests of every part.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(super) mod test_support {
    pub use super::*;
    pub use jsonwebtoken::{encode, EncodingKey, Header};
    pub use serde_json::json;
    pub use std::sync::atomic::AtomicUsize;
    pub use std::sync::Mutex;
    pub use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub use crate::config::JwtConfig;
    pub use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    pub use base64::Engine as _;
    pub use hyper::header::HeaderName;
    pub use jsonwebtoken::{Algorithm, DecodingKey};
    pub use std::sync::atomic::Ordering;
    pub use std::sync::Arc;
    pub use std::time::UNIX_EPOCH;

    pub const RSA_PRIV: &str = include_str!("../../../tests/fixtures/jwt/rsa_private.pem");
    pub const RSA_PUB: &str = include_str!("../../../tests/fixtures/jwt/rsa_public.pem");
    pub const EC1_PRIV: &str = include_str!("../../../tests/fixtures/jwt/ec1_private.pem");
    pub const EC1_PUB: &str = include_str!("../../../tests/fixtures/jwt/ec1_public.pem");
    pub const EC2_PRIV: &str = include_str!("../../../tests/fixtures/jwt/ec2_private.pem");
    pub const EC2_PUB: &str = include_str!("../../../tests/fixtures/jwt/ec2_public.pem");
    pub const ED_PRIV: &str = include_str!("../../../tests/fixtures/jwt/ed_private.pem");
    pub const SECRET: &str = "an HS256 test secret of more than 32 bytes";

    pub fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    /// A file in the temp dir holding `content`; returns its path.
    /// A fresh file per call: tests run in parallel, and rewriting a shared
    /// path while another test reads it gives it a truncated secret.
    pub fn temp_file(name: &str, content: &str) -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wsguard-jwt-{}-{n}-{name}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }

    pub fn config(yaml: &str) -> JwtConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    /// Builds a policy from YAML; `{RSA_PUB}`, `{EC1_PUB}`, `{ED_PUB}` and
    /// `{SECRET_FILE}` are replaced by fixture paths.
    pub fn policy(yaml: &str) -> Arc<Jwt> {
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

    pub fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    pub fn claims() -> serde_json::Value {
        json!({ "sub": "alice", "exp": now() + 600, "iat": now() })
    }

    pub fn token(
        alg: Algorithm,
        kid: Option<&str>,
        claims: &serde_json::Value,
        key: &EncodingKey,
    ) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, key).unwrap()
    }

    pub fn hs() -> EncodingKey {
        EncodingKey::from_secret(SECRET.as_bytes())
    }
    pub fn rsa() -> EncodingKey {
        EncodingKey::from_rsa_pem(RSA_PRIV.as_bytes()).unwrap()
    }
    pub fn ec1() -> EncodingKey {
        EncodingKey::from_ec_pem(EC1_PRIV.as_bytes()).unwrap()
    }
    pub fn ec2() -> EncodingKey {
        EncodingKey::from_ec_pem(EC2_PRIV.as_bytes()).unwrap()
    }

    pub fn b64(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    /// A token with an arbitrary header, HMAC-SHA256-signed with `secret`.
    pub fn hand_signed(
        header: serde_json::Value,
        claims: &serde_json::Value,
        secret: &[u8],
    ) -> String {
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

    pub fn ec_jwk(public_pem: &str, kid: &str) -> serde_json::Value {
        let k = DecodingKey::from_ec_pem(public_pem.as_bytes()).unwrap();
        let p = k.try_get_as_bytes().unwrap();
        assert_eq!(p.len(), 65);
        json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&p[1..33]), "y": b64(&p[33..65]),
        })
    }

    pub fn jwks(keys: &[serde_json::Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    // -- a JWKS server -------------------------------------------------------

    pub struct JwksServer {
        /// Status and body of every answer; status 0 = close without answering.
        answer: Mutex<(u16, String)>,
        hits: AtomicUsize,
    }

    impl JwksServer {
        pub fn set(&self, status: u16, body: String) {
            *self.answer.lock().unwrap() = (status, body);
        }
        pub fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    pub async fn serve(status: u16, body: String) -> (Arc<JwksServer>, String) {
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

    pub fn es256_jwks_policy(url: &str) -> Arc<Jwt> {
        policy(&format!(
            "mode: enforce\nalgorithms: [ES256]\njwks_url: \"{url}\"\njwks_refresh: 0s\n"
        ))
    }

    pub async fn rs_verifier(extra: &str) -> Verifier {
        Verifier::new(policy(&format!(
            "mode: enforce\nkeys: [{{file: \"{{RSA_PUB}}\"}}]\n{extra}"
        )))
    }
}
