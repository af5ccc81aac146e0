//! TLS termination, mTLS, wss:// upstreams, and certificate reload.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

type Ca = CertifiedIssuer<'static, KeyPair>;

fn make_ca(cn: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(
        params,
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
    )
    .unwrap()
}

/// (cert PEM, key PEM).
fn leaf(ca: &Ca, cn: &str, server: bool) -> (String, String) {
    let sans = if server {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        vec![]
    };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("wsguard-it-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = make_ca(&format!("{name} CA"));
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }
    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
    /// Writes server.crt/server.key with the given CN.
    fn server(&self, cn: &str) {
        let (c, k) = leaf(&self.ca, cn, true);
        std::fs::write(self.dir.join("server.crt"), c).unwrap();
        std::fs::write(self.dir.join("server.key"), k).unwrap();
    }
    fn client_config(&self, client_cn: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.pem().as_bytes()).unwrap())
            .unwrap();
        let b = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut cfg = match client_cn {
            None => b.with_no_client_auth(),
            Some(cn) => {
                let (c, k) = leaf(&self.ca, cn, false);
                b.with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(c.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
                )
                .unwrap()
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type TlsWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn wss(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    extra: Option<(&str, &str)>,
) -> Result<(TlsWs, String), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = within(
        "tls",
        tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    let peer_cn = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .map(|c| wsguard::tls::identity_from_cert(&c).subject)
        .unwrap_or_default();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("wss://localhost:{}/", addr.port()),
    )
    .unwrap();
    if let Some((k, v)) = extra {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (ws, _) = within(
        "wss handshake",
        tokio_tungstenite::client_async_with_config(req, tls, None),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((ws, peer_cn))
}

const OFF: &str = "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits: { per_ip: null, per_connection: null }\n";

#[tokio::test]
async fn wss_echo_through_wsguard() {
    wsguard::tls::install_provider();
    let pki = Pki::new("echo");
    pki.server("localhost");
    let p = proxy(
        echo_backend().await,
        &format!(
            "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n{OFF}",
            pki.file("server.crt"),
            pki.file("server.key")
        ),
    )
    .await;
    let (mut c, cn) = wss(p.addr, pki.client_config(None), None).await.unwrap();
    assert_eq!(cn, "localhost");
    c.send(Message::text("over tls")).await.unwrap();
    assert_eq!(
        within("echo", c.next()).await.unwrap().unwrap(),
        Message::text("over tls")
    );
    // A plain-text client gets nothing useful: the TLS handshake fails.
    let (mut r, _) = (Raw::connect(p.addr).await, ());
    tokio::io::AsyncWriteExt::write_all(&mut r.s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(r.eof().await);
    assert!(metric(&p, "wsguard_handshakes_total{result=\"tls_error\"}") >= 1.0);
}

#[tokio::test]
async fn mtls_requires_a_valid_client_certificate_and_forwards_its_subject() {
    wsguard::tls::install_provider();
    let pki = Pki::new("mtls");
    pki.server("localhost");
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &format!(
            "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  client_ca_file: \"{}\"\n  client_subject_header: x-client-subject\n{OFF}",
            pki.file("server.crt"),
            pki.file("server.key"),
            pki.file("ca.pem")
        ),
    )
    .await;
    // No client certificate: the handshake fails.
    let err = wss(p.addr, pki.client_config(None), None).await;
    assert!(err.is_err());
    // A certificate from another CA fails too.
    let other = Pki::new("mtls-other");
    let mut cfg = (*other.client_config(Some("mallory"))).clone();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.pem().as_bytes()).unwrap())
        .unwrap();
    cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![
                CertificateDer::from_pem_slice(leaf(&other.ca, "mallory", false).0.as_bytes())
                    .unwrap(),
            ],
            PrivateKeyDer::from_pem_slice(leaf(&other.ca, "mallory", false).1.as_bytes()).unwrap(),
        )
        .unwrap_or(cfg);
    assert!(wss(p.addr, Arc::new(cfg), None).await.is_err());
    // A valid one connects; its subject reaches the backend, a forged copy does not.
    let (mut c, _) = wss(
        p.addr,
        pki.client_config(Some("alice")),
        Some(("x-client-subject", "admin")),
    )
    .await
    .unwrap();
    c.send(Message::text("hi")).await.unwrap();
    assert_eq!(
        within("echo", c.next()).await.unwrap().unwrap(),
        Message::text("hi")
    );
    let Seen::Request { headers, .. } = seen(&mut rx).await else {
        panic!()
    };
    let subj: Vec<_> = headers
        .iter()
        .filter(|(k, _)| k == "x-client-subject")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(subj, vec!["alice"]);
    let proto: Vec<_> = headers
        .iter()
        .filter(|(k, _)| k == "x-forwarded-proto")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(proto, vec!["https"]);
}

/// A TLS echo backend with a certificate from `pki`.
async fn tls_echo_backend(pki: &Pki) -> SocketAddr {
    let cfg = wsguard::tls::server_config(
        pki.dir.join("server.crt").as_path(),
        pki.dir.join("server.key").as_path(),
        None,
    )
    .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&cfg));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    a
}

#[tokio::test]
async fn wss_upstream_with_a_private_ca() {
    wsguard::tls::install_provider();
    let pki = Pki::new("upstream");
    pki.server("localhost");
    let backend = tls_echo_backend(&pki).await;
    let base = format!("listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\n{OFF}");
    let p = proxy_yaml(&format!(
        "{base}upstream:\n  url: \"wss://localhost:{}\"\n  tls: {{ ca_file: \"{}\" }}\n",
        backend.port(),
        pki.file("ca.pem")
    ))
    .await;
    assert_echo(p.addr).await;
    // Without the private CA the backend's certificate is not trusted: 502.
    let p = proxy_yaml(&format!(
        "{base}upstream:\n  url: \"wss://localhost:{}\"\n",
        backend.port()
    ))
    .await;
    assert_eq!(Raw::upgrade(p.addr, "/", "").await.1.status, 502);
    // server_name overrides SNI and the verified name.
    let p = proxy_yaml(&format!(
        "{base}upstream:\n  url: \"wss://127.0.0.1:{}\"\n  tls: {{ ca_file: \"{}\", server_name: localhost }}\n",
        backend.port(),
        pki.file("ca.pem")
    ))
    .await;
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn bad_tls_material_is_a_policy_problem_naming_the_file() {
    wsguard::tls::install_provider();
    let pki = Pki::new("bad");
    std::fs::write(pki.dir.join("garbage.crt"), "not a certificate").unwrap();
    let err = wsguard::policy::Policy::from_text(
        "p.yaml",
        &format!(
            "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n",
            pki.file("garbage.crt"),
            pki.file("missing.key")
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("p.yaml:2:") && err.contains("garbage.crt"),
        "{err}"
    );
}

#[tokio::test]
async fn sighup_swaps_certificate_and_origin_list_while_sessions_live() {
    use crate::process::{policy_file, Proc, ANY_PORTS};
    wsguard::tls::install_provider();
    let pki = Pki::new("swap");
    pki.server("first");
    let backend = echo_backend().await;
    let policy = |origin: &str| {
        format!(
            "{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\ntls: {{ cert_file: \"{}\", key_file: \"{}\" }}\norigin: {{ mode: enforce, allow: [\"{origin}\"] }}\n",
            pki.file("server.crt"),
            pki.file("server.key")
        )
    };
    let f = policy_file("swap", &policy("https://a.example"));
    let mut p = Proc::spawn(&f);
    let (addr, _): (SocketAddr, _) = p.listening().await;
    let cfg = pki.client_config(None);
    let (mut live, cn) = wss(
        addr,
        Arc::clone(&cfg),
        Some(("origin", "https://a.example")),
    )
    .await
    .unwrap();
    assert_eq!(cn, "first");
    assert!(wss(
        addr,
        Arc::clone(&cfg),
        Some(("origin", "https://b.example"))
    )
    .await
    .is_err());

    pki.server("second");
    std::fs::write(&f, policy("https://b.example")).unwrap();
    p.signal("HUP");
    p.log_line("policy reloaded").await;

    // New connections get the new certificate and the new allow-list.
    let (mut fresh, cn) = wss(
        addr,
        Arc::clone(&cfg),
        Some(("origin", "https://b.example")),
    )
    .await
    .unwrap();
    assert_eq!(cn, "second");
    assert!(wss(
        addr,
        Arc::clone(&cfg),
        Some(("origin", "https://a.example"))
    )
    .await
    .is_err());
    // The session opened under the old policy keeps echoing.
    for c in [&mut live, &mut fresh] {
        c.send(Message::text("still here")).await.unwrap();
        assert_eq!(
            within("echo", c.next()).await.unwrap().unwrap(),
            Message::text("still here")
        );
    }
    drop(live);
    drop(fresh);
    p.signal("TERM");
    assert_eq!(p.exit_code().await, Some(0));
}
