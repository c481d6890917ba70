//! TLS end to end with a test CA generated here (nothing is read from the repository):
//! SNI selection, the default certificate, chains with intermediates, ECDSA/Ed25519/RSA
//! keys, `min_version`, mTLS, plain HTTP on a TLS port, certificate reload under a live
//! connection, and wss:// to an upstream.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A throwaway PKI in a temp directory: a root CA, an intermediate, and leaves.
struct Pki {
    dir: PathBuf,
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, cn);
    p
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("wsgate-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let root = CertifiedIssuer::self_signed(
            ca_params("wsgate test root"),
            KeyPair::generate().unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let intermediate = CertifiedIssuer::signed_by(
            ca_params("wsgate test intermediate"),
            KeyPair::generate().unwrap_or_else(|e| panic!("{e}")),
            &root,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join("ca.crt"), root.pem()).unwrap_or_else(|e| panic!("{e}"));
        Pki {
            dir,
            root,
            intermediate,
        }
    }

    fn ca_path(&self) -> String {
        self.dir.join("ca.crt").display().to_string()
    }

    /// A leaf for `names` signed by the intermediate; the chain file holds leaf +
    /// intermediate. Returns (cert path, key path).
    fn leaf(
        &self,
        file: &str,
        names: &[&str],
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (String, String) {
        let key = KeyPair::generate_for(alg).unwrap_or_else(|e| panic!("{e}"));
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("{e}"));
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params
            .signed_by(&key, &self.intermediate)
            .unwrap_or_else(|e| panic!("{e}"));
        let cert_path = self.dir.join(format!("{file}.crt"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(
            &cert_path,
            format!("{}{}", cert.pem(), self.intermediate.pem()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.root.der().clone())
            .unwrap_or_else(|e| panic!("{e}"));
        roots
    }

    /// A client trusting the root, with optional client certificate (leaf, key paths).
    fn client(&self, tls12_only: bool, identity: Option<(&str, &str)>) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(self.roots());
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(read_chain(cert), read_key(key))
                .unwrap_or_else(|e| panic!("{e}")),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_chain(path: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|c| c.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn read_key(path: &str) -> PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path).unwrap_or_else(|e| panic!("{e}"))
}

/// The leaf the server presents for `sni` (no verification).
async fn served_leaf(addr: std::net::SocketAddr, sni: &str) -> Vec<u8> {
    // The served chain is recorded, not judged (to see which certificate SNI picked).
    let config = insecure_tls(&[b"http/1.1"]);
    let tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let name = ServerName::try_from(sni.to_owned()).unwrap_or_else(|e| panic!("{e}"));
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN");
    session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default()
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A WebSocket over TLS to the gateway, verifying the chain against the test root.
async fn wss(
    addr: std::net::SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> Result<Wss, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let url = format!("wss://{sni}/echo");
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(url, tls))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn echo_once(ws: &mut Wss, text: &str) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

fn tls_config(certs: &[(String, String)], extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|(c, k)| format!("{{ cert: \"{c}\", key: \"{k}\" }}"))
        .collect();
    format!(
        r#"
listeners:
  - name: secure
    bind: "127.0.0.1:0"
    tls: {{ certificates: [{}] {extra} }}
upstreams:
  echo: {{ builtin: echo }}
routes:
  - {{ name: echo, match: {{ path_prefix: / }}, upstream: echo }}
"#,
        list.join(", ")
    )
}

fn der_of(path: &str) -> Vec<u8> {
    read_chain(path)[0].to_vec()
}

#[tokio::test]
async fn sni_picks_the_certificate_and_unknown_names_get_the_default() {
    let pki = Pki::new("sni");
    let a = pki.leaf("a", &["a.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let b = pki.leaf("b", &["*.b.test"], &rcgen::PKCS_ED25519);
    let gw = spawn_gateway(&tls_config(&[a.clone(), b.clone()], "")).await;
    assert_eq!(served_leaf(gw.addr(), "a.test").await, der_of(&a.0));
    assert_eq!(served_leaf(gw.addr(), "x.b.test").await, der_of(&b.0));
    assert_eq!(
        served_leaf(gw.addr(), "unknown.test").await,
        der_of(&a.0),
        "default = first certificate"
    );
    // A verifying client (chain through the intermediate) relays end to end.
    let mut ws = wss(gw.addr(), "x.b.test", pki.client(false, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    echo_once(&mut ws, "over tls")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["tls"]["sni"], "x.b.test");
    assert_eq!(line["tls"]["version"], "1.3");
}

#[tokio::test]
async fn rsa_keys_work_too() {
    let pki = Pki::new("rsa");
    let key = pki.dir.join("rsa.key");
    let status = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("openssl unavailable: RSA case skipped");
        return;
    }
    let pem = std::fs::read_to_string(&key).unwrap_or_else(|e| panic!("{e}"));
    let key_pair = KeyPair::from_pem(&pem).unwrap_or_else(|e| panic!("{e}"));
    let params =
        CertificateParams::new(vec!["rsa.test".to_string()]).unwrap_or_else(|e| panic!("{e}"));
    let cert = params
        .signed_by(&key_pair, &pki.intermediate)
        .unwrap_or_else(|e| panic!("{e}"));
    let cert_path = pki.dir.join("rsa.crt");
    std::fs::write(
        &cert_path,
        format!("{}{}", cert.pem(), pki.intermediate.pem()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let pair = (cert_path.display().to_string(), key.display().to_string());
    let gw = spawn_gateway(&tls_config(&[pair], "")).await;
    let mut ws = wss(gw.addr(), "rsa.test", pki.client(false, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    echo_once(&mut ws, "rsa")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn tls12_only_client_is_refused_when_min_version_is_13() {
    let pki = Pki::new("min13");
    let a = pki.leaf("a", &["a.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let gw = spawn_gateway(&tls_config(&[a], ", min_version: \"1.3\"")).await;
    let before = gw.gw.shared.metrics.tls_handshake_failures();
    assert!(
        wss(gw.addr(), "a.test", pki.client(true, None))
            .await
            .is_err()
    );
    let mut ws = wss(gw.addr(), "a.test", pki.client(false, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    echo_once(&mut ws, "1.3 is fine")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(gw.gw.shared.metrics.tls_handshake_failures() > before);
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new("mtls");
    let server = pki.leaf("server", &["mtls.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let client = pki.leaf("client", &["client-7"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let gw = spawn_gateway(&tls_config(
        &[server],
        &format!(", client_ca: \"{}\"", pki.ca_path()),
    ))
    .await;
    let refused = match wss(gw.addr(), "mtls.test", pki.client(false, None)).await {
        Err(_) => true,
        Ok(mut ws) => echo_once(&mut ws, "x").await.is_err(),
    };
    assert!(
        refused,
        "a client without a certificate must not get through"
    );
    let mut ws = wss(
        gw.addr(),
        "mtls.test",
        pki.client(false, Some((&client.0, &client.1))),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    echo_once(&mut ws, "with a certificate")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    let subject = line["tls"]["client_subject"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(subject.contains("CN=client-7"), "{line}");
}

#[tokio::test]
async fn plain_http_on_a_tls_port_fails_cleanly() {
    let pki = Pki::new("plain");
    let a = pki.leaf("a", &["a.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let gw = spawn_gateway(&tls_config(&[a], "")).await;
    let before = gw.gw.shared.metrics.tls_handshake_failures();
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 101"),
        "no upgrade over plain text"
    );
    assert!(gw.gw.shared.metrics.tls_handshake_failures() > before);
    assert!(
        gw.log_lines().is_empty(),
        "a failed TLS handshake never reaches the HTTP layer"
    );
}

#[tokio::test]
async fn reload_swaps_the_certificate_while_a_live_connection_keeps_relaying() {
    let pki = Pki::new("reload");
    let old = pki.leaf("old", &["r.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let gw = spawn_gateway(&tls_config(std::slice::from_ref(&old), "")).await;
    let mut live = wss(gw.addr(), "r.test", pki.client(false, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    echo_once(&mut live, "before")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let new = pki.leaf("new", &["r.test"], &rcgen::PKCS_ED25519);
    let text =
        tls_config(std::slice::from_ref(&new), "").replace("127.0.0.1:0", &gw.addr().to_string());
    let config = wsgate::config::Config::from_yaml_str_with_env(&text, "reload.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let reloaded = gw.gw.reload(config.clone()).await;
    assert_eq!(reloaded.certificates, ["secure"]);
    assert!(reloaded.bound.is_empty() && reloaded.closed.is_empty());
    assert_eq!(served_leaf(gw.addr(), "r.test").await, der_of(&new.0));
    echo_once(&mut live, "after")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A broken file never gets that far: the config does not load.
    std::fs::write(&new.0, "not a certificate").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wsgate::config::Config::from_yaml_str_with_env(&text, "reload.yaml", &|_| None).is_err()
    );
    assert_eq!(
        served_leaf(gw.addr(), "r.test").await,
        der_of_bytes(&config)
    );
}

fn der_of_bytes(config: &wsgate::config::Config) -> Vec<u8> {
    config.listeners[0]
        .tls
        .as_ref()
        .map(|t| t.certificates[0].key.cert[0].to_vec())
        .unwrap_or_default()
}

#[tokio::test]
async fn wss_upstream_with_a_configured_ca_and_sni() {
    let pki = Pki::new("upstream");
    let (cert, key) = pki.leaf("backend", &["backend.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let backend = tls_echo_backend(&cert, &key).await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
upstreams:
  secure: {{ backends: [{{ addr: "{backend}" }}], tls: {{ ca: "{}", sni: backend.test }} }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, upstream: secure }}
"#,
        pki.ca_path()
    );
    let gw = spawn_gateway(&yaml).await;
    let mut ws = connect(&gw.url("/x")).await;
    ws.send(Message::text("through wss"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = tokio::time::timeout(PATIENCE, ws.next()).await;
    assert!(
        matches!(got, Ok(Some(Ok(Message::Text(ref t)))) if t.as_str() == "through wss"),
        "{got:?}"
    );
    // Without the right CA the upstream handshake fails: 502 before any 101.
    let stranger = Pki::new("stranger");
    let yaml = yaml.replace(&pki.ca_path(), &stranger.ca_path());
    let bad = spawn_gateway(&yaml).await;
    let resp = raw_request(bad.addr(), b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 502 "), "{resp}");
    // The log line says why: the TLS failure with its reason (issue 22 item 3).
    let line = bad
        .log_line(|l| l["proxy_reason"] == "upstream_connect")
        .await;
    let error = line["upstream_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("connect: TLS: ") && error.contains("certificate"),
        "{line}"
    );
}

/// An echo server speaking wss with the given certificate; with `client_ca`, it requires
/// client certificates from that CA.
async fn tls_echo_backend(cert: &str, key: &str) -> std::net::SocketAddr {
    tls_echo_backend_with(cert, key, None).await
}

async fn tls_echo_backend_with(
    cert: &str,
    key: &str,
    client_ca: Option<RootCertStore>,
) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"));
    let builder = match client_ca {
        Some(roots) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(read_chain(cert), read_key(key))
        .unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
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
    addr
}

#[tokio::test]
async fn wss_upstream_with_a_client_certificate() {
    let pki = Pki::new("upstream-mtls");
    let (cert, key) = pki.leaf("backend", &["backend.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (ccert, ckey) = pki.leaf("gateway", &["gateway-client"], &rcgen::PKCS_ED25519);
    let backend = tls_echo_backend_with(&cert, &key, Some(pki.roots())).await;
    let yaml = |client_cert: &str| {
        format!(
            r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
upstreams:
  secure: {{ backends: [{{ addr: "{backend}" }}], tls: {{ ca: "{}", sni: backend.test {client_cert} }} }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, upstream: secure }}
"#,
            pki.ca_path()
        )
    };
    let gw = spawn_gateway(&yaml(&format!(
        ", client_cert: {{ cert: \"{ccert}\", key: \"{ckey}\" }}"
    )))
    .await;
    let mut ws = connect(&gw.url("/x")).await;
    ws.send(Message::text("mutual"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = tokio::time::timeout(PATIENCE, ws.next()).await;
    assert!(
        matches!(got, Ok(Some(Ok(Message::Text(ref t)))) if t.as_str() == "mutual"),
        "{got:?}"
    );
    // Without the client certificate the backend refuses the TLS handshake: 502.
    let bare = spawn_gateway(&yaml("")).await;
    let resp = raw_request(bare.addr(), b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 502 "), "{resp}");
}

/// One WebSocket over TLS through `gw` with `client` (its session store keeps tickets),
/// one echo (which also reads the tickets the server sent after the handshake), a clean
/// close; true when the client resumed a session.
async fn resumed_once(addr: std::net::SocketAddr, client: &Arc<ClientConfig>) -> bool {
    let mut ws = wss(addr, "localhost", client.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resumed = ws.get_ref().get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    echo_once(&mut ws, "tickets")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    resumed
}

/// Issue 19: with shared `ticket_keys`, a session a client got from one wsgate resumes on
/// a second one (as behind an L4 balancer), and not on one with other keys; tickets are on
/// by default (one instance), off with `session_tickets: false`. Resumption shows in the
/// access log (`tls.resumed`) and in `wsgate_tls_handshakes_total`.
#[tokio::test]
async fn tickets_resume_across_instances_sharing_ticket_keys() {
    let pki = Pki::new("tickets");
    let leaf = pki.leaf("localhost", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let keys = |name: &str, text: &str| {
        let path = pki.dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        path.display().to_string()
    };
    let a = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
    let b = "# another fleet\nffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n";
    let with = |extra: String| {
        let yaml = tls_config(std::slice::from_ref(&leaf), &extra);
        format!("{yaml}admin: {{ bind: \"127.0.0.1:0\" }}\n")
    };
    let one = spawn_gateway(&with(format!(", ticket_keys: \"{}\"", keys("a1", a)))).await;
    let two = spawn_gateway(&with(format!(", ticket_keys: \"{}\"", keys("a2", a)))).await;
    let other = spawn_gateway(&with(format!(", ticket_keys: \"{}\"", keys("b", b)))).await;

    let client = pki.client(false, None);
    assert!(
        !resumed_once(one.addr(), &client).await,
        "the first handshake is full"
    );
    assert!(
        resumed_once(two.addr(), &client).await,
        "a ticket of `one` resumes on `two`"
    );
    assert!(
        !resumed_once(other.addr(), &client).await,
        "other keys cannot open it"
    );

    let line = two.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["tls"]["resumed"], true);
    let line = other.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["tls"]["resumed"], false);
    let scrape = scrape(&two).await;
    let resumed = [("listener", "secure"), ("resumed", "true")];
    assert_eq!(
        metric(&scrape, "wsgate_tls_handshakes_total", &resumed),
        1.0
    );

    // Defaults: tickets on within one instance; `session_tickets: false`: never resumed.
    let default = spawn_gateway(&with(String::new())).await;
    let client = pki.client(false, None);
    assert!(!resumed_once(default.addr(), &client).await);
    assert!(resumed_once(default.addr(), &client).await);
    let off = spawn_gateway(&with(", session_tickets: false".into())).await;
    let client = pki.client(false, None);
    assert!(!resumed_once(off.addr(), &client).await);
    assert!(!resumed_once(off.addr(), &client).await);
}

/// A ticket a client got from a listener without `client_ca` must not let it through an
/// mTLS listener of the same process (a resumed handshake skips client authentication).
#[tokio::test]
async fn a_ticket_from_a_plain_tls_listener_never_passes_an_mtls_one() {
    let pki = Pki::new("tickets-mtls");
    let leaf = pki.leaf("localhost", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let public = spawn_gateway(&tls_config(std::slice::from_ref(&leaf), "")).await;
    let mtls_extra = format!(", client_ca: \"{}\"", pki.ca_path());
    let mtls = spawn_gateway(&tls_config(std::slice::from_ref(&leaf), &mtls_extra)).await;
    let client = pki.client(false, None);
    assert!(!resumed_once(public.addr(), &client).await);
    // The client holds a ticket now, and no certificate: still refused.
    let through = match wss(mtls.addr(), "localhost", client.clone()).await {
        Ok(mut ws) => echo_once(&mut ws, "no certificate").await.is_ok(),
        Err(_) => false,
    };
    assert!(
        !through,
        "a ticket let a client without a certificate through mTLS"
    );
}
