//! TLS: the listener's server configuration (optionally with client
//! certificates, mTLS), the client configuration for `wss://` upstreams, and
//! what we know about a verified client certificate.
//!
//! Everything here uses the aws-lc-rs provider explicitly, so a different
//! process-wide default (installed by another crate) never changes what
//! wsguard offers. Only TLS 1.3 and 1.2 are enabled, with the provider's
//! default (AEAD-only, forward-secret) cipher suites and key exchange groups.
//! ALPN is always `http/1.1`: WebSocket (RFC 6455) runs over HTTP/1.1.
//!
//! Loading is done eagerly and strictly so that every problem surfaces at
//! start-up or on `SIGHUP`, never at the first handshake: a missing or empty
//! file, bad PEM, an encrypted or unsupported key, a certificate that does not
//! parse, and a key that does not belong to the certificate are all errors
//! that name the file. On reload the caller builds a new config with
//! [`server_config`] and swaps it in only when that succeeds; connections
//! already established keep the config they were accepted with.
//!
//! Certificates are decoded with the RustCrypto `x509-cert` crate (and its
//! `der`): strict DER and the RFC 5280 structure, checked for every
//! certificate at load and read for the validity warnings. Client
//! certificates are described by [`ClientIdentity`], read from the (already
//! verified) certificate: the subject's common name, the whole subject as an
//! RFC 4514 string (formatted here, not by the crate), and the SHA-256
//! fingerprint. All text in it is printable ASCII, so it is safe to put in a
//! log line or an HTTP header value as is. Input the crate cannot decode
//! gives no subject, never a panic.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use x509_cert::der::Decode;
use x509_cert::time::Time;
use x509_cert::Certificate;

/// The only application protocol we negotiate.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a TLS configuration could not be built. Every file-related variant
/// names the file, and the `Display` text is meant for an operator.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read (missing, permissions, a directory, ...).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no `CERTIFICATE` PEM section.
    #[error("no certificate found in {}", .0.display())]
    NoCertificate(PathBuf),
    /// The file holds no private key PEM section (`PRIVATE KEY`,
    /// `RSA PRIVATE KEY` or `EC PRIVATE KEY`).
    #[error("no private key found in {}", .0.display())]
    NoPrivateKey(PathBuf),
    /// The key is encrypted (`ENCRYPTED PRIVATE KEY` or a `Proc-Type: 4,ENCRYPTED` header).
    #[error("{}: the private key is encrypted; wsguard needs an unencrypted key (protect it with file permissions)", .0.display())]
    EncryptedKey(PathBuf),
    /// The file is not well-formed PEM.
    #[error("{}: invalid PEM: {detail}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The private key could not be loaded (bad DER, or an unsupported type or curve).
    #[error("{}: unsupported or invalid private key: {detail}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A certificate in the file does not parse.
    #[error("{}: invalid certificate{}: {detail}", path.display(), index_suffix(*index))]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Position of the certificate in the file, from 1.
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// The private key does not belong to the first certificate of the chain.
    #[error("{}: key does not match certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// A CA file is usable as PEM but a certificate in it is not a usable trust anchor.
    #[error("{}: invalid CA certificate{}: {detail}", path.display(), index_suffix(*index))]
    CaCertificate {
        /// The file.
        path: PathBuf,
        /// Position of the certificate in the file, from 1.
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// The client-certificate verifier could not be built from the CA file.
    #[error("{}: cannot verify client certificates: {detail}", path.display())]
    ClientVerifier {
        /// The client CA file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No trust anchor at all for upstream connections.
    #[error("no trusted root certificates for wss:// upstreams: the system store has none ({detail}) and upstream.tls.ca_file is not set")]
    NoRoots {
        /// What happened while loading the system store.
        detail: String,
    },
    /// The name to present and verify is not a valid DNS name or IP address.
    #[error("invalid TLS server name {name:?}: {detail}")]
    ServerName {
        /// The offending name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration (should not happen with our fixed settings).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn index_suffix(index: usize) -> String {
    if index > 1 {
        format!(" #{index}")
    } else {
        String::new()
    }
}

/// The aws-lc-rs provider, built once.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Installs aws-lc-rs as the process-wide rustls provider, for libraries that
/// build their own rustls configs from the process default. Idempotent and
/// cheap after the first call; if another provider was installed first it is
/// left in place (wsguard's own configs name aws-lc-rs explicitly anyway).
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if CryptoProvider::get_default().is_none()
            && rustls::crypto::aws_lc_rs::default_provider()
                .install_default()
                .is_err()
        {
            tracing::debug!("a rustls crypto provider was installed concurrently; keeping it");
        }
    });
}

/// Server side: the certificate chain (leaf first) and private key PEM files;
/// with `client_ca_file`, clients must present a certificate that chains to
/// one of the CAs in it (mTLS), and a handshake without one fails.
///
/// TLS 1.2 and 1.3 only, ALPN `http/1.1` (a client offering ALPN without
/// `http/1.1` is refused; a client offering no ALPN is accepted). Keys: RSA,
/// ECDSA (P-256, P-384, P-521) and Ed25519, as PKCS#8, PKCS#1 (RSA) or SEC1
/// (EC). The key is checked against the leaf certificate here. An expired or
/// not-yet-valid leaf is only a warning in the log, as with nginx.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certified = load_certified_key(cert_file, key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13, &TLS12])?;
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let roots = load_roots(ca_file)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::ClientVerifier {
                    path: ca_file.to_path_buf(),
                    detail: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Client side for `wss://` upstreams: the system roots (rustls-native-certs,
/// which honours `SSL_CERT_FILE` / `SSL_CERT_DIR`; certificates that do not
/// parse are skipped) plus every certificate of `ca_file`, which must all be
/// valid. With no usable system root and no `ca_file` this is an error
/// ([`TlsError::NoRoots`]) rather than a config that can never verify anything.
/// ALPN `http/1.1`, TLS 1.2 and 1.3, no client certificate.
///
/// This reads the system store, so build it once per policy load, not per
/// connection.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(error = %err, "error while loading system root certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(
            added,
            ignored,
            "skipped unparsable system root certificates"
        );
    }
    match ca_file {
        Some(ca_file) => {
            let extra = load_roots(ca_file)?;
            roots.roots.extend(extra.roots);
        }
        None if roots.is_empty() => {
            let detail = match native.errors.first() {
                Some(err) => err.to_string(),
                None => "no certificates found".to_owned(),
            };
            return Err(TlsError::NoRoots { detail });
        }
        None => {}
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13, &TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// The server name to present (SNI) and to verify the upstream's certificate
/// against: `override_name` (`upstream.tls.server_name`) when set, else the
/// URL host. IPv6 literals may be bracketed (`[::1]`). An IP address is
/// verified against the certificate's IP SANs and sent without SNI.
pub fn server_name(
    host: &str,
    override_name: Option<&str>,
) -> Result<ServerName<'static>, TlsError> {
    let raw = override_name.unwrap_or(host);
    let name = raw
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(raw);
    if name.is_empty() {
        return Err(TlsError::ServerName {
            name: raw.to_owned(),
            detail: "empty".to_owned(),
        });
    }
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName {
        name: raw.to_owned(),
        detail: "not a valid DNS name or IP address".to_owned(),
    })
}

/// What we know about a verified client certificate, for logs and an
/// optional upstream header. All strings are printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject's common name (the last CN attribute if there are several),
    /// escaped as an RFC 4514 attribute value; `sha256:<fingerprint>` when the
    /// subject has no CN or it could not be read.
    pub subject: String,
    /// The subject's common name as in `subject`, or `None` if there is none.
    pub common_name: Option<String>,
    /// The whole subject as an RFC 4514 string (most specific RDN first, e.g.
    /// `CN=alice,OU=dev,O=Example`); empty for an empty subject, `None` if it
    /// could not be parsed.
    pub subject_dn: Option<String>,
    /// SHA-256 of the certificate's DER, lowercase hex (64 characters).
    pub fingerprint_sha256: String,
}

/// The identity of the client certificate of a (completed) server-side
/// connection, or `None` if the client presented none.
pub fn client_identity(conn: &ServerConnection) -> Option<ClientIdentity> {
    conn.peer_certificates()?.first().map(identity_from_cert)
}

/// The identity of one DER certificate (see [`ClientIdentity`]).
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> ClientIdentity {
    let fingerprint_sha256 = hex(&Sha256::digest(cert.as_ref()));
    let subject =
        parse_cert(cert.as_ref()).and_then(|c| name::describe(c.tbs_certificate().subject()));
    let (common_name, subject_dn) = match subject {
        Some((dn, cn)) => (cn, Some(dn)),
        None => (None, None),
    };
    ClientIdentity {
        subject: match &common_name {
            Some(cn) if !cn.is_empty() => cn.clone(),
            _ => format!("sha256:{fingerprint_sha256}"),
        },
        common_name,
        subject_dn,
        fingerprint_sha256,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

// ---------------------------------------------------------------- loading

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::files::read_bounded(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(path: &Path, err: pem::Error) -> TlsError {
    let detail = match err {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "section not terminated (missing \"-----END {}-----\")",
            String::from_utf8_lossy(&end_marker).trim()
        ),
        pem::Error::IllegalSectionStart { .. } => "malformed \"-----BEGIN\" line".to_owned(),
        pem::Error::Base64Decode(_) => "bad base64 inside a section".to_owned(),
        other => other.to_string(),
    };
    TlsError::Pem {
        path: path.to_path_buf(),
        detail,
    }
}

/// Every `CERTIFICATE` section of a PEM file, each checked to be a
/// structurally sound X.509 certificate; at least one.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        let cert = item.map_err(|e| pem_error(path, e))?;
        if parse_cert(cert.as_ref()).is_none() {
            return Err(TlsError::Certificate {
                path: path.to_path_buf(),
                index: certs.len() + 1,
                detail: "not a DER-encoded X.509 certificate".to_owned(),
            });
        }
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) if is_encrypted_pem(&bytes) => {
            Err(TlsError::EncryptedKey(path.to_path_buf()))
        }
        Err(pem::Error::NoItemsFound) => Err(TlsError::NoPrivateKey(path.to_path_buf())),
        Err(e) => Err(pem_error(path, e)),
    }
}

fn is_encrypted_pem(bytes: &[u8]) -> bool {
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    contains(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || contains(b"Proc-Type: 4,ENCRYPTED")
}

fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_file.to_path_buf(),
            detail: e.to_string(),
        })?;
    warn_if_out_of_validity(cert_file, &certs);
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                key: key_file.to_path_buf(),
                cert: cert_file.to_path_buf(),
            })
        }
        // Our provider exposes the public key of every key type it loads, so
        // this does not happen; like rustls, do not fail on it.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            tracing::warn!(key_file = %key_file.display(), "cannot check that the TLS key matches the certificate");
            Ok(certified)
        }
        Err(e) => Err(TlsError::Certificate {
            path: cert_file.to_path_buf(),
            index: 1,
            detail: e.to_string(),
        }),
    }
}

fn warn_if_out_of_validity(cert_file: &Path, certs: &[CertificateDer<'_>]) {
    let Some(leaf) = certs.first().and_then(|c| parse_cert(c.as_ref())) else {
        return;
    };
    let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        return;
    };
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = leaf.tbs_certificate().validity();
    // `Time`'s Display is RFC 3339 UTC: 2001-01-01T00:00:00Z.
    if now > unix_seconds(validity.not_after) {
        tracing::warn!(
            cert_file = %cert_file.display(),
            not_after = %validity.not_after,
            "the TLS certificate has expired; clients will reject it"
        );
    }
    if now < unix_seconds(validity.not_before) {
        tracing::warn!(
            cert_file = %cert_file.display(),
            not_before = %validity.not_before,
            "the TLS certificate is not valid yet; clients will reject it"
        );
    }
}

/// Every certificate of a CA PEM file as a trust anchor; all must be usable.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in load_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::CaCertificate {
            path: path.to_path_buf(),
            index: i + 1,
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

// ---------------------------------------------------------------- X.509

/// A certificate decoded by the `x509-cert` crate: strict DER, the RFC 5280
/// structure, nothing after it. Malformed input gives `None`, never a panic.
fn parse_cert(der: &[u8]) -> Option<Certificate> {
    Certificate::from_der(der).ok()
}

/// Seconds since the Unix epoch of a certificate time (the crate only
/// represents times from 1970 on).
fn unix_seconds(t: Time) -> i64 {
    i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------- names

/// X.501 Name (as decoded by `x509-cert`) to an RFC 4514 string. The crate's
/// own `Display` leaves non-ASCII text as is and knows fewer string types, so
/// the text is made here.
mod name {
    use x509_cert::der::asn1::BmpString;
    use x509_cert::der::{Any, Encode, Tag, Tagged};
    use x509_cert::name::Name;

    /// The subject as RFC 4514 text and the last CN value (escaped); `None`
    /// when an RDN is empty or a value cannot be re-encoded.
    pub(super) fn describe(name: &Name) -> Option<(String, Option<String>)> {
        let mut rdns = Vec::new();
        let mut cn = None;
        for rdn in name.iter_rdn() {
            if rdn.is_empty() {
                return None;
            }
            let mut attrs = Vec::with_capacity(rdn.len());
            for atv in rdn.iter() {
                let dotted = atv.oid.to_string();
                let short = short_name(&dotted);
                let text = match (short, decode_string(&atv.value)) {
                    (Some(_), Some(text)) => {
                        let text = escape_value(&text);
                        if dotted == "2.5.4.3" {
                            cn = Some(text.clone());
                        }
                        text
                    }
                    // RFC 4514 2.4: unknown types, or values that are not
                    // strings, as '#' + hex of the BER encoding.
                    _ => format!("#{}", super::hex(&atv.value.to_der().ok()?)),
                };
                attrs.push(format!("{}={text}", short.unwrap_or(&dotted)));
            }
            rdns.push(attrs.join("+"));
        }
        rdns.reverse();
        Some((rdns.join(","), cn))
    }

    fn short_name(dotted: &str) -> Option<&'static str> {
        Some(match dotted {
            "2.5.4.3" => "CN",
            "2.5.4.4" => "SN",
            "2.5.4.5" => "serialNumber",
            "2.5.4.6" => "C",
            "2.5.4.7" => "L",
            "2.5.4.8" => "ST",
            "2.5.4.9" => "STREET",
            "2.5.4.10" => "O",
            "2.5.4.11" => "OU",
            "2.5.4.12" => "title",
            "2.5.4.42" => "GN",
            "0.9.2342.19200300.100.1.1" => "UID",
            "0.9.2342.19200300.100.1.25" => "DC",
            "1.2.840.113549.1.9.1" => "emailAddress",
            _ => return None,
        })
    }

    /// The text of an ASN.1 string value, or `None` for other types or bad
    /// encodings. The 8-bit types are read leniently, as certificates in the
    /// wild use them: any ASCII for the restricted ones (a PrintableString
    /// with `*` or `@` is common), Latin-1 for TeletexString.
    fn decode_string(v: &Any) -> Option<String> {
        match v.tag() {
            Tag::Utf8String => v.decode_as::<String>().ok(),
            Tag::NumericString | Tag::PrintableString | Tag::Ia5String | Tag::VisibleString => v
                .value()
                .is_ascii()
                .then(|| v.value().iter().map(|&b| char::from(b)).collect()),
            Tag::TeletexString => Some(v.value().iter().map(|&b| char::from(b)).collect()),
            Tag::BmpString => v.decode_as::<BmpString>().ok().map(|s| s.to_string()),
            _ => None,
        }
    }

    /// RFC 4514 2.4 escaping, plus `\XX` for every byte of a control or
    /// non-ASCII character, so the result is printable ASCII.
    pub(super) fn escape_value(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let last = s.chars().count().saturating_sub(1);
        for (i, c) in s.chars().enumerate() {
            match c {
                '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                '#' if i == 0 => out.push_str("\\#"),
                ' ' if i == 0 || i == last => out.push_str("\\ "),
                ' '..='~' => out.push(c),
                _ => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\{b:02X}"));
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------- tests

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, DnValue,
        ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    // ------------------------------------------------------------ fixtures

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "wsguard-tls-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
        fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let p = self.path(name);
            std::fs::write(&p, contents).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    type Ca = CertifiedIssuer<'static, KeyPair>;

    fn make_ca(cn: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        CertifiedIssuer::self_signed(params, key).unwrap()
    }

    fn server_params() -> CertificateParams {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params
    }

    fn client_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Corp");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params
    }

    /// (cert PEM, key PEM) of a leaf signed by `ca`.
    fn leaf(
        ca: &Ca,
        params: &CertificateParams,
        alg: &'static SignatureAlgorithm,
    ) -> (String, String) {
        let key = KeyPair::generate_for(alg).unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    struct Pki {
        dir: TempDir,
        ca: Ca,
        ca_file: PathBuf,
        cert_file: PathBuf,
        key_file: PathBuf,
    }

    fn pki_with(alg: &'static SignatureAlgorithm) -> Pki {
        let dir = TempDir::new();
        let ca = make_ca("wsguard test CA");
        let ca_file = dir.write("ca.pem", ca.pem());
        let (cert, key) = leaf(&ca, &server_params(), alg);
        // A chain file: leaf then the CA (the CA is harmless in a chain).
        let cert_file = dir.write("server.crt", format!("{cert}{}", ca.pem()));
        let key_file = dir.write("server.key", key);
        Pki {
            dir,
            ca,
            ca_file,
            cert_file,
            key_file,
        }
    }

    fn pki() -> Pki {
        pki_with(&rcgen::PKCS_ECDSA_P256_SHA256)
    }

    fn roots_of(ca_file: &Path) -> RootCertStore {
        load_roots(ca_file).unwrap()
    }

    /// A client config trusting `ca_file`, offering `versions`, optionally with a client cert.
    fn test_client(
        ca_file: &Path,
        versions: &[&'static rustls::SupportedProtocolVersion],
        client_cert: Option<(&str, &str)>,
    ) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots_of(ca_file));
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let chain: Vec<_> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Arc::new(config)
    }

    #[derive(Debug)]
    struct ServerSide {
        version: Option<rustls::ProtocolVersion>,
        alpn: Option<Vec<u8>>,
        identity: Option<ClientIdentity>,
        resumed: bool,
    }

    /// One connection over TCP on 127.0.0.1: handshake, then the client
    /// sends "ping" and the server answers "pong". Returns what each side saw.
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> (Result<ServerSide, String>, Result<(), String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ping");
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let conn = tls.get_ref().1;
            Ok(ServerSide {
                version: conn.protocol_version(),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                identity: client_identity(conn),
                resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            })
        };
        let client_task = async move {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"pong");
            Ok(())
        };
        let both = async { tokio::join!(server_task, client_task) };
        tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("handshake test timed out")
    }

    fn localhost() -> ServerName<'static> {
        server_name("localhost", None).unwrap()
    }

    fn have_openssl() -> bool {
        std::process::Command::new("openssl")
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn openssl(args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // ------------------------------------------------------------ handshakes

    #[test]
    fn install_provider_is_idempotent() {
        install_provider();
        install_provider();
        assert!(CryptoProvider::get_default().is_some());
    }

    #[tokio::test]
    async fn tls13_handshake_negotiates_http11() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, None).unwrap();
        let client = test_client(&p.ca_file, &[&TLS13, &TLS12], None);
        let (s, c) = exchange(server, client, localhost()).await;
        c.unwrap();
        let s = s.unwrap();
        assert_eq!(s.version, Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(s.alpn.as_deref(), Some(ALPN_HTTP11));
        assert_eq!(s.identity, None);
    }

    #[tokio::test]
    async fn tls12_only_client_is_served() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, None).unwrap();
        let client = test_client(&p.ca_file, &[&TLS12], None);
        let (s, c) = exchange(server, client, localhost()).await;
        c.unwrap();
        let s = s.unwrap();
        assert_eq!(s.version, Some(rustls::ProtocolVersion::TLSv1_2));
        assert_eq!(s.alpn.as_deref(), Some(ALPN_HTTP11));
    }

    #[tokio::test]
    async fn client_without_alpn_is_served_and_wrong_alpn_is_refused() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, None).unwrap();

        let mut no_alpn = (*test_client(&p.ca_file, &[&TLS13], None)).clone();
        no_alpn.alpn_protocols.clear();
        let (s, c) = exchange(server.clone(), Arc::new(no_alpn), localhost()).await;
        c.unwrap();
        assert_eq!(s.unwrap().alpn, None);

        let mut h2_only = (*test_client(&p.ca_file, &[&TLS13], None)).clone();
        h2_only.alpn_protocols = vec![b"h2".to_vec()];
        let (s, c) = exchange(server, Arc::new(h2_only), localhost()).await;
        assert!(s.is_err());
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn ed25519_and_p384_server_keys() {
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let p = pki_with(alg);
            let server = server_config(&p.cert_file, &p.key_file, None).unwrap();
            for versions in [&[&TLS13][..], &[&TLS12][..]] {
                let client = test_client(&p.ca_file, versions, None);
                let (s, c) = exchange(server.clone(), client, localhost()).await;
                c.unwrap();
                s.unwrap();
            }
        }
    }

    /// rcgen with its default ring backend cannot generate RSA keys, so the
    /// RSA keys (PKCS#8 and PKCS#1) and a SEC1 EC key come from openssl; the
    /// test is skipped (with a note on stderr) when openssl is not installed.
    #[tokio::test]
    async fn rsa_pkcs8_pkcs1_and_ec_sec1_keys_from_openssl() {
        if !have_openssl() {
            eprintln!("skipping: openssl not found, RSA / SEC1 key formats not tested");
            return;
        }
        let p = pki();
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let rsa8 = p.dir.path("rsa8.key");
        let rsa1 = p.dir.path("rsa1.key");
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &s(&rsa8),
        ]);
        openssl(&["pkey", "-in", &s(&rsa8), "-traditional", "-out", &s(&rsa1)]);
        let rsa1_pem = std::fs::read_to_string(&rsa1).unwrap();
        assert!(rsa1_pem.contains("BEGIN RSA PRIVATE KEY"), "{rsa1_pem}");

        let rsa_key = KeyPair::from_pem(&std::fs::read_to_string(&rsa8).unwrap()).unwrap();
        let rsa_cert = server_params().signed_by(&rsa_key, &p.ca).unwrap();
        let rsa_cert_file = p.dir.write("rsa.crt", rsa_cert.pem());

        let ec8 = p.dir.path("ec8.key");
        let ec1 = p.dir.path("ec1.key");
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &s(&ec8),
        ]);
        openssl(&["pkey", "-in", &s(&ec8), "-traditional", "-out", &s(&ec1)]);
        let ec1_pem = std::fs::read_to_string(&ec1).unwrap();
        assert!(ec1_pem.contains("BEGIN EC PRIVATE KEY"), "{ec1_pem}");
        let ec_key = KeyPair::from_pem(&std::fs::read_to_string(&ec8).unwrap()).unwrap();
        let ec_cert = server_params().signed_by(&ec_key, &p.ca).unwrap();
        let ec_cert_file = p.dir.write("ec.crt", ec_cert.pem());

        for (cert_file, key_file) in [
            (&rsa_cert_file, &rsa8),
            (&rsa_cert_file, &rsa1),
            (&ec_cert_file, &ec1),
        ] {
            let server = server_config(cert_file, key_file, None).unwrap();
            for versions in [&[&TLS13][..], &[&TLS12][..]] {
                let client = test_client(&p.ca_file, versions, None);
                let (s, c) = exchange(server.clone(), client, localhost()).await;
                c.unwrap_or_else(|e| panic!("{}: {e}", key_file.display()));
                s.unwrap();
            }
        }
        // An RSA key with the ECDSA certificate is a mismatch.
        let err = server_config(&p.cert_file, &rsa1, None).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    // ------------------------------------------------------------ mTLS

    #[tokio::test]
    async fn mtls_requires_a_client_certificate() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, Some(&p.ca_file)).unwrap();
        let client = test_client(&p.ca_file, &[&TLS13, &TLS12], None);
        let (s, c) = exchange(server, client, localhost()).await;
        let s = s.unwrap_err();
        assert!(
            s.contains("peer sent no certificates") || s.contains("NoCertificates"),
            "{s}"
        );
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn mtls_accepts_a_valid_client_certificate_and_reports_its_identity() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, Some(&p.ca_file)).unwrap();
        let (cert, key) = leaf(
            &p.ca,
            &client_params("alice"),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        for versions in [&[&TLS13][..], &[&TLS12][..]] {
            let client = test_client(&p.ca_file, versions, Some((&cert, &key)));
            let (s, c) = exchange(server.clone(), client, localhost()).await;
            c.unwrap();
            let id = s.unwrap().identity.expect("client identity");
            assert_eq!(id.subject, "alice");
            assert_eq!(id.common_name.as_deref(), Some("alice"));
            assert_eq!(id.subject_dn.as_deref(), Some("CN=alice,O=Example Corp"));
            let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            assert_eq!(id.fingerprint_sha256, hex(&Sha256::digest(der.as_ref())));
            assert_eq!(id.fingerprint_sha256.len(), 64);
        }
    }

    #[tokio::test]
    async fn mtls_resumed_session_keeps_the_client_identity() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, Some(&p.ca_file)).unwrap();
        let (cert, key) = leaf(
            &p.ca,
            &client_params("carol"),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        for versions in [&[&TLS13][..], &[&TLS12][..]] {
            let client = test_client(&p.ca_file, versions, Some((&cert, &key)));
            let (s, c) = exchange(server.clone(), client.clone(), localhost()).await;
            c.unwrap();
            assert!(!s.unwrap().resumed);
            let (s, c) = exchange(server.clone(), client, localhost()).await;
            c.unwrap();
            let s = s.unwrap();
            assert!(s.resumed, "{versions:?}");
            assert_eq!(s.identity.unwrap().subject, "carol");
        }
        // A config built again (SIGHUP) starts with an empty session cache.
        let reloaded = server_config(&p.cert_file, &p.key_file, Some(&p.ca_file)).unwrap();
        let client = test_client(&p.ca_file, &[&TLS13], Some((&cert, &key)));
        let (s, c) = exchange(server, client.clone(), localhost()).await;
        c.unwrap();
        s.unwrap();
        let (s, c) = exchange(reloaded, client, localhost()).await;
        c.unwrap();
        assert!(!s.unwrap().resumed);
    }

    #[tokio::test]
    async fn mtls_rejects_a_client_certificate_from_another_ca() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, Some(&p.ca_file)).unwrap();
        let other = make_ca("some other CA");
        let (cert, key) = leaf(
            &other,
            &client_params("mallory"),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        for versions in [&[&TLS13][..], &[&TLS12][..]] {
            let client = test_client(&p.ca_file, versions, Some((&cert, &key)));
            let (s, c) = exchange(server.clone(), client, localhost()).await;
            let s = s.unwrap_err();
            assert!(
                s.contains("UnknownIssuer") || s.contains("unknown issuer"),
                "{s}"
            );
            assert!(c.is_err());
        }
    }

    #[tokio::test]
    async fn mtls_rejects_a_server_only_certificate_as_client_certificate() {
        // The server's own certificate has EKU serverAuth only.
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, Some(&p.ca_file)).unwrap();
        let (cert, key) = leaf(&p.ca, &server_params(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let client = test_client(&p.ca_file, &[&TLS13], Some((&cert, &key)));
        let (s, c) = exchange(server, client, localhost()).await;
        assert!(s.is_err());
        assert!(c.is_err());
    }

    // ------------------------------------------------------------ upstream side

    #[tokio::test]
    async fn client_config_with_private_ca_verifies_the_server() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, None).unwrap();
        let client = client_config(Some(&p.ca_file)).unwrap();
        assert_eq!(client.alpn_protocols, vec![ALPN_HTTP11.to_vec()]);
        let (s, c) = exchange(server.clone(), client.clone(), localhost()).await;
        c.unwrap();
        assert_eq!(s.unwrap().alpn.as_deref(), Some(ALPN_HTTP11));

        // By IP address (the certificate has an IP SAN).
        let ip = server_name("127.0.0.1", None).unwrap();
        let (s, c) = exchange(server.clone(), client.clone(), ip).await;
        c.unwrap();
        s.unwrap();

        // A name the certificate does not cover fails.
        let wrong = server_name("127.0.0.1", Some("other.example")).unwrap();
        let (_, c) = exchange(server, client, wrong).await;
        let c = c.unwrap_err();
        assert!(
            c.contains("NotValidForName") || c.contains("not valid for name"),
            "{c}"
        );
    }

    #[tokio::test]
    async fn client_config_without_the_private_ca_rejects_the_server() {
        let p = pki();
        let server = server_config(&p.cert_file, &p.key_file, None).unwrap();
        match client_config(None) {
            // No system roots here: that is an error of its own.
            Err(TlsError::NoRoots { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(client) => {
                let (_, c) = exchange(server, client, localhost()).await;
                let c = c.unwrap_err();
                assert!(
                    c.contains("UnknownIssuer") || c.contains("unknown issuer"),
                    "{c}"
                );
            }
        }
    }

    #[test]
    fn client_config_bad_ca_file_names_the_file() {
        let dir = TempDir::new();
        let missing = dir.path("missing-ca.pem");
        let err = client_config(Some(&missing)).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read ") && err.contains("missing-ca.pem"),
            "{err}"
        );

        let empty = dir.write("empty-ca.pem", "");
        let err = client_config(Some(&empty)).unwrap_err().to_string();
        assert_eq!(err, format!("no certificate found in {}", empty.display()));
    }

    #[test]
    fn server_name_rules() {
        assert_eq!(
            server_name("backend.internal", None).unwrap(),
            ServerName::try_from("backend.internal").unwrap()
        );
        assert_eq!(
            server_name("10.0.0.7", Some("api.example.com")).unwrap(),
            ServerName::try_from("api.example.com").unwrap()
        );
        assert!(matches!(
            server_name("127.0.0.1", None).unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]", None).unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("::1", None).unwrap(),
            ServerName::IpAddress(_)
        ));
        for bad in ["", "bad name", "exa mple.com", "[]", "a..b"] {
            let err = server_name(bad, None).unwrap_err();
            assert!(matches!(err, TlsError::ServerName { .. }), "{bad}: {err}");
        }
        // An explicit but empty override is a mistake, not "use the host".
        assert!(server_name("localhost", Some("")).is_err());
        let err = server_name("localhost", Some("no_such name"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"no_such name\""), "{err}");
    }

    // ------------------------------------------------------------ bad material

    fn err_of(cert: &Path, key: &Path, ca: Option<&Path>) -> String {
        server_config(cert, key, ca).unwrap_err().to_string()
    }

    #[test]
    fn missing_files_are_named() {
        let p = pki();
        let missing = p.dir.path("nope.crt");
        let err = err_of(&missing, &p.key_file, None);
        assert!(
            err.starts_with(&format!("cannot read {}: ", missing.display())),
            "{err}"
        );
        let missing_key = p.dir.path("nope.key");
        let err = err_of(&p.cert_file, &missing_key, None);
        assert!(
            err.starts_with(&format!("cannot read {}: ", missing_key.display())),
            "{err}"
        );
        let missing_ca = p.dir.path("nope-ca.pem");
        let err = err_of(&p.cert_file, &p.key_file, Some(&missing_ca));
        assert!(
            err.starts_with(&format!("cannot read {}: ", missing_ca.display())),
            "{err}"
        );
        // A directory is not a file.
        let err = err_of(&p.dir.0, &p.key_file, None);
        assert!(err.starts_with("cannot read "), "{err}");
    }

    #[test]
    fn empty_files_are_named() {
        let p = pki();
        let empty = p.dir.write("empty.pem", "");
        assert_eq!(
            err_of(&empty, &p.key_file, None),
            format!("no certificate found in {}", empty.display())
        );
        assert_eq!(
            err_of(&p.cert_file, &empty, None),
            format!("no private key found in {}", empty.display())
        );
        assert_eq!(
            err_of(&p.cert_file, &p.key_file, Some(&empty)),
            format!("no certificate found in {}", empty.display())
        );
        // A key file given as the certificate and vice versa.
        assert_eq!(
            err_of(&p.key_file, &p.key_file, None),
            format!("no certificate found in {}", p.key_file.display())
        );
        assert_eq!(
            err_of(&p.cert_file, &p.cert_file, None),
            format!("no private key found in {}", p.cert_file.display())
        );
    }

    #[test]
    fn garbage_pem_is_named() {
        let p = pki();
        let text = p.dir.write("text.pem", "hello, this is not PEM\n");
        assert_eq!(
            err_of(&text, &p.key_file, None),
            format!("no certificate found in {}", text.display())
        );

        let bad_b64 = p.dir.write(
            "b64.pem",
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        );
        let err = err_of(&bad_b64, &p.key_file, None);
        assert!(
            err.starts_with(&format!("{}: invalid PEM: ", bad_b64.display())),
            "{err}"
        );

        let unterminated = p
            .dir
            .write("open.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let err = err_of(&unterminated, &p.key_file, None);
        assert!(
            err.starts_with(&format!("{}: invalid PEM: ", unterminated.display())),
            "{err}"
        );
        assert!(err.contains("-----END CERTIFICATE-----"), "{err}");

        // Valid base64, but not a certificate.
        let junk = p.dir.write(
            "junk.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        assert_eq!(
            err_of(&junk, &p.key_file, None),
            format!(
                "{}: invalid certificate: not a DER-encoded X.509 certificate",
                junk.display()
            )
        );
        // ... as the second certificate of a chain.
        let chain = p.dir.write(
            "chain.pem",
            format!(
                "{}-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
                std::fs::read_to_string(&p.cert_file).unwrap()
            ),
        );
        let err = err_of(&chain, &p.key_file, None);
        assert!(
            err.starts_with(&format!("{}: invalid certificate #", chain.display())),
            "{err}"
        );

        let junk_key = p.dir.write(
            "junk.key",
            "-----BEGIN PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END PRIVATE KEY-----\n",
        );
        let err = err_of(&p.cert_file, &junk_key, None);
        assert!(
            err.starts_with(&format!(
                "{}: unsupported or invalid private key: ",
                junk_key.display()
            )),
            "{err}"
        );

        let encrypted = p.dir.write(
            "enc.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let err = err_of(&p.cert_file, &encrypted, None);
        assert!(
            err.starts_with(&format!(
                "{}: the private key is encrypted",
                encrypted.display()
            )),
            "{err}"
        );

        // A CA file whose certificate parses as DER but is not a usable anchor
        // is covered by `load_roots`; garbage in it is named like the others.
        let err = err_of(&p.cert_file, &p.key_file, Some(&junk));
        assert!(
            err.starts_with(&format!("{}: invalid certificate", junk.display())),
            "{err}"
        );
    }

    #[test]
    fn key_not_matching_certificate_is_an_error_at_load() {
        let p = pki();
        let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = p.dir.write("other.key", other_key.serialize_pem());
        assert_eq!(
            err_of(&p.cert_file, &other, None),
            format!(
                "{}: key does not match certificate in {}",
                other.display(),
                p.cert_file.display()
            )
        );
        // Different algorithm entirely.
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed = p.dir.write("ed.key", ed.serialize_pem());
        assert!(matches!(
            server_config(&p.cert_file, &ed, None).unwrap_err(),
            TlsError::KeyMismatch { .. }
        ));
        // The CA key with the server certificate.
        let ca_key = p.dir.write("ca.key", p.ca.key().serialize_pem());
        assert!(matches!(
            server_config(&p.cert_file, &ca_key, None).unwrap_err(),
            TlsError::KeyMismatch { .. }
        ));
    }

    #[test]
    fn chain_order_matters_leaf_first() {
        // CA first, then the leaf: the "leaf" is the CA, which the key does not match.
        let p = pki();
        let pem = std::fs::read_to_string(&p.cert_file).unwrap();
        let leaf_pem = pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap();
        let reversed = p
            .dir
            .write("reversed.crt", format!("{}{leaf_pem}", p.ca.pem()));
        assert!(matches!(
            server_config(&reversed, &p.key_file, None).unwrap_err(),
            TlsError::KeyMismatch { .. }
        ));
    }

    #[test]
    fn combined_cert_and_key_file_works() {
        let p = pki();
        let both = p.dir.write(
            "both.pem",
            format!(
                "{}{}",
                std::fs::read_to_string(&p.key_file).unwrap(),
                std::fs::read_to_string(&p.cert_file).unwrap()
            ),
        );
        server_config(&both, &both, None).unwrap();
    }

    #[test]
    fn expired_certificate_loads_with_a_warning() {
        let p = pki();
        let mut params = server_params();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let (cert, key) = leaf(&p.ca, &params, &rcgen::PKCS_ECDSA_P256_SHA256);
        let cert_file = p.dir.write("expired.crt", cert);
        let key_file = p.dir.write("expired.key", key);
        server_config(&cert_file, &key_file, None).unwrap();
        let der = CertificateDer::from_pem_file(&cert_file).unwrap();
        let parsed = parse_cert(der.as_ref()).unwrap();
        let validity = parsed.tbs_certificate().validity();
        assert_eq!(unix_seconds(validity.not_before), 946_684_800);
        assert_eq!(unix_seconds(validity.not_after), 978_307_200);
        // The format of the warning's not_after field.
        assert_eq!(validity.not_after.to_string(), "2001-01-01T00:00:00Z");
    }

    #[test]
    fn certificate_dated_before_1970_is_refused_at_load() {
        // x509-cert represents times from 1970 on (like webpki, which would
        // refuse such a certificate in a chain anyway).
        let p = pki();
        let mut params = server_params();
        params.not_before = rcgen::date_time_ymd(1960, 1, 1);
        let (cert, key) = leaf(&p.ca, &params, &rcgen::PKCS_ECDSA_P256_SHA256);
        let cert_file = p.dir.write("old.crt", cert);
        let key_file = p.dir.write("old.key", key);
        let err = server_config(&cert_file, &key_file, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid certificate: not a DER-encoded X.509 certificate"),
            "{err}"
        );
    }

    #[test]
    fn reload_builds_an_independent_config() {
        // What SIGHUP does: build again from the (changed) files; a failure
        // leaves the caller's old config untouched.
        let p = pki();
        let first = server_config(&p.cert_file, &p.key_file, None).unwrap();
        std::fs::write(&p.key_file, "").unwrap();
        assert!(server_config(&p.cert_file, &p.key_file, None).is_err());
        let (cert, key) = leaf(&p.ca, &server_params(), &rcgen::PKCS_ED25519);
        std::fs::write(&p.cert_file, cert).unwrap();
        std::fs::write(&p.key_file, key).unwrap();
        let second = server_config(&p.cert_file, &p.key_file, None).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
    }

    // ------------------------------------------------------------ identity / DER

    fn cert_with_dn(dn: DistinguishedName) -> CertificateDer<'static> {
        let ca = make_ca("id CA");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.signed_by(&key, &ca).unwrap().der().clone()
    }

    #[test]
    fn identity_escapes_rfc4514_and_non_ascii() {
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString("DE".try_into().unwrap()),
        );
        dn.push(DnType::OrganizationName, "Müller, Söhne & Co");
        dn.push(DnType::OrganizationalUnitName, "#ops ");
        dn.push(
            DnType::CustomDnType(vec![0, 9, 2342, 19_200_300, 100, 1, 25]),
            DnValue::Ia5String("example".try_into().unwrap()),
        );
        dn.push(DnType::CustomDnType(vec![1, 2, 3, 4]), "x");
        dn.push(DnType::CommonName, " Doe+\"J\";<a>\\b\r\n");
        let id = identity_from_cert(&cert_with_dn(dn));
        let cn = r#"\ Doe\+\"J\"\;\<a\>\\b\0D\0A"#;
        assert_eq!(id.subject, cn);
        assert_eq!(id.common_name.as_deref(), Some(cn));
        // The CN is last in DER order, so first in RFC 4514; the unknown OID is dotted with a hex value.
        assert_eq!(
            id.subject_dn.as_deref(),
            Some(&*format!(
                r"CN={cn},1.2.3.4=#0c0178,DC=example,OU=\#ops\ ,O=M\C3\BCller\, S\C3\B6hne & Co,C=DE"
            ))
        );
        assert!(id
            .subject_dn
            .unwrap()
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b)));
    }

    #[test]
    fn identity_without_cn_uses_the_fingerprint() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "NoName Inc");
        let der = cert_with_dn(dn);
        let id = identity_from_cert(&der);
        assert_eq!(id.common_name, None);
        assert_eq!(id.subject, format!("sha256:{}", id.fingerprint_sha256));
        assert_eq!(id.subject_dn.as_deref(), Some("O=NoName Inc"));

        let id = identity_from_cert(&cert_with_dn(DistinguishedName::new()));
        assert_eq!(id.subject_dn.as_deref(), Some(""));
        assert!(id.subject.starts_with("sha256:"));
    }

    #[test]
    fn identity_of_garbage_and_truncations_never_panics() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "bob");
        let der = cert_with_dn(dn).as_ref().to_vec();
        let id = identity_from_cert(&CertificateDer::from(der.clone()));
        assert_eq!(id.subject, "bob");
        for len in 0..der.len() {
            let id = identity_from_cert(&CertificateDer::from(der[..len].to_vec()));
            assert!(id.subject.starts_with("sha256:"));
        }
        for i in 0..der.len() {
            for x in [0x00, 0x01, 0x80, 0xff] {
                let mut m = der.clone();
                m[i] ^= x;
                let _ = identity_from_cert(&CertificateDer::from(m));
            }
        }
    }

    #[test]
    fn identity_of_bmp_and_universal_strings() {
        // BMPString is decoded by the crate (UCS-2), then escaped as usual.
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::OrganizationName,
            DnValue::BmpString("\u{c5}bo".try_into().unwrap()),
        );
        dn.push(DnType::CommonName, "carol");
        let id = identity_from_cert(&cert_with_dn(dn));
        assert_eq!(id.subject_dn.as_deref(), Some(r"CN=carol,O=\C3\85bo"));
        // UniversalString is a tag the crate's `der` does not know: the
        // certificate does not decode, so there is no subject and the
        // identity is the fingerprint.
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            DnValue::UniversalString("dave".try_into().unwrap()),
        );
        let id = identity_from_cert(&cert_with_dn(dn));
        assert_eq!(id.common_name, None);
        assert_eq!(id.subject_dn, None);
        assert_eq!(id.subject, format!("sha256:{}", id.fingerprint_sha256));
    }

    #[test]
    fn sha256_hex_known_vector() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// A UTCTime (0x17) or GeneralizedTime (0x18) as the crate decodes it
    /// in a certificate, in Unix seconds.
    fn parse_time(tag: u8, s: &str) -> Option<i64> {
        let mut der = vec![tag, u8::try_from(s.len()).unwrap()];
        der.extend_from_slice(s.as_bytes());
        Time::from_der(&der).ok().map(unix_seconds)
    }

    fn format_time(t: u64) -> String {
        let dt = x509_cert::der::DateTime::from_unix_duration(std::time::Duration::from_secs(t));
        Time::from(dt.unwrap()).to_string()
    }

    fn dotted_oid(bytes: &[u8]) -> Option<String> {
        x509_cert::der::oid::ObjectIdentifier::from_bytes(bytes)
            .ok()
            .map(|o| o.to_string())
    }

    #[test]
    fn der_times_and_oids() {
        assert_eq!(parse_time(0x17, "700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, "491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, "20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(0x18, "40960101000000Z"), Some(67_090_118_400));
        assert_eq!(parse_time(0x17, "700101000000"), None);
        assert_eq!(parse_time(0x17, "7001010000Z"), None);
        assert_eq!(parse_time(0x18, "2000131000000Z"), None);
        assert_eq!(parse_time(0x17, "7O0101000000Z"), None);
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(dotted_oid(&[0x55, 0x04, 0x03]).as_deref(), Some("2.5.4.3"));
        assert_eq!(
            dotted_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]).as_deref(),
            Some("1.2.840.113549.1.9.1")
        );
        // const-oid (under x509-cert) takes at most 39 for the second arc
        // under 2, so 2.999 is refused, and a certificate that names it does
        // not decode (the identity falls back to the fingerprint).
        assert_eq!(dotted_oid(&[0x88, 0x37]), None);
        assert_eq!(dotted_oid(&[0x55, 0x84]), None);
        assert_eq!(dotted_oid(&[]), None);
        assert_eq!(name::escape_value("a b"), "a b");
        assert_eq!(name::escape_value(" "), "\\ ");
        assert_eq!(name::escape_value("a#"), "a#");
        assert_eq!(name::escape_value("é"), "\\C3\\A9");
    }
}
