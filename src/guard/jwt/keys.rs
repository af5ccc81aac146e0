//! Verification keys: PEM public keys read at load, with the algorithms
//! each may verify (its family, and for EC its curve).

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use rustls_pki_types::pem::{PemObject, SectionKind};

/// A PEM key file larger than this is refused.
const MAX_PEM_BYTES: u64 = 64 * 1024;
/// RSA keys shorter than this are refused (the verifier would refuse them
/// anyway, on every request).
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

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
    pub(super) fn accepts(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }
}

/// Reads a PEM public key; returns it with every algorithm it could verify.
pub(super) fn read_pem_key(file: &str) -> Result<(DecodingKey, Vec<Algorithm>), String> {
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
    // The first section rustls-pki-types knows decides. PKCS#1 `RSA PUBLIC
    // KEY` is not one of its labels; a file holding nothing it knows is
    // given to jsonwebtoken's RSA reader (which takes PKCS#1) below, and is
    // refused if that fails too.
    let first = <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .next()
        .transpose()
        .map_err(|e| format!("not a PEM file: {e}"))?;
    match first.map(|(kind, _)| kind) {
        Some(SectionKind::PublicKey) => {}
        Some(SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey) => {
            return Err(
                "is a private key; give the public key (`openssl pkey -in KEY -pubout`)"
                    .to_string(),
            );
        }
        Some(other) => {
            return Err(format!(
                "expected a public key (-----BEGIN PUBLIC KEY-----), found -----BEGIN {}-----",
                label(other)
            ));
        }
        None => {
            return match DecodingKey::from_rsa_pem(bytes) {
                Ok(key) => rsa_key(key),
                Err(_) => Err(
                    "not a PEM file with a public key (-----BEGIN PUBLIC KEY-----); \
                     encrypted and OpenSSH keys are not read"
                        .to_string(),
                ),
            };
        }
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        return rsa_key(key);
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

/// The PEM label of a section kind rustls-pki-types knows.
fn label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        SectionKind::EchConfigList => "ECHCONFIG",
        _ => "an unknown section",
    }
}

/// An RSA key of an accepted size, with the RSA algorithms.
fn rsa_key(key: DecodingKey) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    let bits = match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => rsa_der_modulus_bits(der),
        DecodingKeyKind::RsaModulusExponent { n, .. } => Some(bit_len(n)),
    }
    .ok_or("not a valid RSA public key")?;
    check_rsa_bits(bits)?;
    Ok((key, AlgorithmFamily::Rsa.algorithms().to_vec()))
}

pub(super) fn check_rsa_bits(bits: usize) -> Result<(), String> {
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
pub(super) fn bit_len(n: &[u8]) -> usize {
    let n = match n.iter().position(|&b| b != 0) {
        Some(i) => n.get(i..).unwrap_or_default(),
        None => return 0,
    };
    match n.first() {
        Some(&top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    }
}

/// Modulus size of a PKCS#1 `RSAPublicKey` (SEQUENCE { INTEGER n, INTEGER e }),
/// read by the `pkcs1` crate; None when the DER is not exactly that.
fn rsa_der_modulus_bits(der: &[u8]) -> Option<usize> {
    use pkcs1::der::Decode;
    let key = pkcs1::RsaPublicKey::<pkcs1::UintRef<'_>>::from_der(der).ok()?;
    Some(bit_len(key.modulus.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::guard::jwt::test_support::*;

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
        // PKCS#1, a label rustls-pki-types does not know, is still read.
        let pkcs1 = include_str!("../../../tests/fixtures/jwt/rsa_public_pkcs1.pem");
        let (_, algs) = pem_key(pkcs1.as_bytes()).unwrap();
        assert_eq!(algs, AlgorithmFamily::Rsa.algorithms());
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(pem_key(encrypted.as_bytes())
            .unwrap_err()
            .contains("encrypted"));
        let broken = "-----BEGIN PUBLIC KEY-----\nMIIB\n";
        assert!(pem_key(broken.as_bytes())
            .unwrap_err()
            .contains("not a PEM"));
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
