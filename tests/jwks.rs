//! `auth.jwt.keys[].jwks_url` end to end (SPEC §2, §7): a JWKS served over TLS by this
//! process (a test CA generated here; the config's `ca` points at it), tokens signed by
//! the served Ed25519 keys, key rotation picked up by the unknown-`kid` refetch, the
//! refetch limit under a flood of made-up `kid`s (counted at the server), the last good
//! keys kept while the server fails, `/readyz` 503 until the first successful fetch, and
//! `wsgate_jwks_refresh_total{result}`.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;

/// A signing key and its public JWK.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn new(kid: &str) -> SigningKey {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap_or_else(|e| panic!("{e}"));
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        SigningKey {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ed_der(&pair.serialize_der()),
            jwk: serde_json::json!({"kty": "OKP", "crv": "Ed25519", "use": "sig", "kid": kid, "x": x}),
        }
    }

    fn token(&self) -> String {
        token_with_kid(&self.encoding, &self.kid)
    }
}

fn token_with_kid(key: &EncodingKey, kid: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 600;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    let claims = serde_json::json!({ "sub": "user-42", "exp": exp });
    encode(&header, &claims, key).unwrap_or_else(|e| panic!("{e}"))
}

fn jwks_of(keys: &[&SigningKey]) -> String {
    let keys: Vec<&serde_json::Value> = keys.iter().map(|k| &k.jwk).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// What the JWKS server answers, and how many requests it has seen.
struct Served {
    status: u16,
    body: String,
    requests: usize,
}

/// An HTTPS server of one JWKS document, with a certificate for 127.0.0.1 from a CA
/// generated here (written to a temp file for the config's `ca`).
struct JwksServer {
    addr: SocketAddr,
    state: Arc<Mutex<Served>>,
    dir: PathBuf,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl JwksServer {
    async fn start(tag: &str, status: u16, body: String) -> JwksServer {
        let dir = std::env::temp_dir().join(format!("wsgate-jwks-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "wsgate jwks test CA");
        let ca = CertifiedIssuer::self_signed(
            ca_params,
            KeyPair::generate().unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap_or_else(|e| panic!("{e}"));
        let leaf_key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut leaf =
            CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        leaf.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        leaf.distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = leaf
            .signed_by(&leaf_key, &ca)
            .unwrap_or_else(|e| panic!("{e}"));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let state = Arc::new(Mutex::new(Served {
            status,
            body,
            requests: 0,
        }));
        let served = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let served = served.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |_req| {
                        let (status, body) = {
                            let mut s = served.lock().unwrap_or_else(|e| e.into_inner());
                            s.requests += 1;
                            (s.status, s.body.clone())
                        };
                        async move {
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, state, dir }
    }

    fn url(&self) -> String {
        format!("https://{}/.well-known/jwks.json", self.addr)
    }

    fn ca_path(&self) -> String {
        self.dir.join("ca.crt").display().to_string()
    }

    fn requests(&self) -> usize {
        self.lock().requests
    }

    fn serve(&self, status: u16, body: String) {
        let mut s = self.lock();
        s.status = status;
        s.body = body;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Served> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A gateway whose one route needs a JWT checked against `server`'s keys.
async fn gateway(server: &JwksServer, refresh: &str) -> TestGateway {
    spawn_gateway(&config(server, refresh, &server.ca_path())).await
}

fn config(server: &JwksServer, refresh: &str, ca: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ handshakes_per_ip: {{ rate: 1000, per: 1s, burst: 1000 }} }}
upstreams:
  app: {{ builtin: echo }}
routes:
  - name: app
    match: {{ path_prefix: / }}
    upstream: app
    auth:
      jwt:
        keys:
          - {{ jwks_url: "{url}", refresh: {refresh}, ca: "{ca}" }}
"#,
        url = server.url(),
    )
}

/// The status of an upgrade carrying `token`.
async fn upgrade_status(gw: &TestGateway, token: &str) -> u16 {
    let (_s, head) = raw_upgrade(
        gw.addr(),
        "/",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn await_ready(gw: &TestGateway) {
    eventually("/readyz 200", PATIENCE, async || {
        match admin_get(gw, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

async fn refreshes(gw: &TestGateway, result: &str) -> f64 {
    metric(
        &scrape(gw).await,
        "wsgate_jwks_refresh_total",
        &[("result", result)],
    )
}

#[tokio::test]
async fn a_rotated_key_is_admitted_after_one_kid_miss_refetch_and_a_kid_flood_fetches_nothing_more()
{
    let first = SigningKey::new("first");
    let server = JwksServer::start("rotate", 200, jwks_of(&[&first])).await;
    let gw = gateway(&server, "1h").await;
    await_ready(&gw).await;
    assert_eq!(server.requests(), 1, "fetched once at start");
    assert_eq!(upgrade_status(&gw, &first.token()).await, 101);

    // The issuer rotates: a token of the new key is refused at once (no waiting on the
    // network), and its unknown kid triggers one refetch that brings the key in.
    let second = SigningKey::new("second");
    server.serve(200, jwks_of(&[&second]));
    let new_token = second.token();
    eventually(
        "the rotated key admitted",
        PATIENCE,
        async || match upgrade_status(&gw, &new_token).await {
            101 => Ok(()),
            other => Err(other),
        },
    )
    .await;
    assert_eq!(server.requests(), 2, "one refetch for the new kid");
    await_metric(&gw, "wsgate_jwks_refresh_total", &[("result", "ok")], 2.0).await;
    assert_eq!(
        upgrade_status(&gw, &first.token()).await,
        401,
        "the retired key no longer verifies"
    );

    // A flood of made-up kids within the 30 s window: every one refused, none fetched.
    for i in 0..40 {
        let forged = token_with_kid(&second.encoding, &format!("made-up-{i}"));
        assert_eq!(upgrade_status(&gw, &forged).await, 401);
    }
    // A refetch would start at once (the fetcher is woken, not scheduled): give it time
    // to reach the server before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.requests(), 2, "the kid flood made no request");
    assert_eq!(upgrade_status(&gw, &new_token).await, 101);
}

#[tokio::test]
async fn a_failing_jwks_server_leaves_the_last_good_keys_in_service() {
    let key = SigningKey::new("k1");
    let server = JwksServer::start("failing", 200, jwks_of(&[&key])).await;
    let gw = gateway(&server, "1h").await;
    await_ready(&gw).await;
    assert_eq!(refreshes(&gw, "error").await, 0.0);

    server.serve(500, "identity provider down".into());
    // An unknown kid asks for a refetch, which fails.
    let forged = token_with_kid(&key.encoding, "unknown");
    assert_eq!(upgrade_status(&gw, &forged).await, 401);
    await_metric(
        &gw,
        "wsgate_jwks_refresh_total",
        &[("result", "error")],
        1.0,
    )
    .await;
    assert_eq!(upgrade_status(&gw, &key.token()).await, 101);

    // A document without any usable key is a failure too, not an empty key set.
    server.serve(200, r#"{"keys": []}"#.into());
    eventually(
        "a retry fails on the empty document",
        PATIENCE,
        async || match refreshes(&gw, "error").await {
            n if n >= 2.0 => Ok(()),
            n => Err(n),
        },
    )
    .await;
    assert_eq!(upgrade_status(&gw, &key.token()).await, 101);
    assert_eq!(admin_get(&gw, "/readyz").await.0, 200, "still ready");
    assert_eq!(refreshes(&gw, "ok").await, 1.0);
}

#[tokio::test]
async fn readyz_is_503_until_the_first_fetch_succeeds() {
    let key = SigningKey::new("k1");
    let server = JwksServer::start("readyz", 503, "not yet".into()).await;
    let gw = gateway(&server, "1h").await;
    await_metric(
        &gw,
        "wsgate_jwks_refresh_total",
        &[("result", "error")],
        1.0,
    )
    .await;
    assert_eq!(admin_get(&gw, "/readyz").await.0, 503);
    assert_eq!(upgrade_status(&gw, &key.token()).await, 401, "no keys yet");

    // Failed fetches are retried within seconds, not after `refresh` (1h here).
    server.serve(200, jwks_of(&[&key]));
    await_ready(&gw).await;
    assert_eq!(upgrade_status(&gw, &key.token()).await, 101);
    assert_eq!(refreshes(&gw, "ok").await, 1.0);
}

#[tokio::test]
async fn a_server_the_ca_does_not_vouch_for_is_never_trusted() {
    let key = SigningKey::new("k1");
    let server = JwksServer::start("stranger", 200, jwks_of(&[&key])).await;
    let stranger = JwksServer::start("stranger-ca", 200, String::new()).await;
    let gw = spawn_gateway(&config(&server, "1h", &stranger.ca_path())).await;
    await_metric(
        &gw,
        "wsgate_jwks_refresh_total",
        &[("result", "error")],
        1.0,
    )
    .await;
    assert_eq!(admin_get(&gw, "/readyz").await.0, 503);
    assert_eq!(upgrade_status(&gw, &key.token()).await, 401);
}

#[tokio::test]
async fn keys_are_refetched_every_refresh() {
    let first = SigningKey::new("first");
    let server = JwksServer::start("refresh", 200, jwks_of(&[&first])).await;
    let gw = gateway(&server, "1s").await;
    await_ready(&gw).await;
    // Rotation without any token naming the new kid: the schedule alone brings it in.
    let second = SigningKey::new("second");
    server.serve(200, jwks_of(&[&second]));
    eventually("a scheduled fetch", PATIENCE, async || {
        match server.requests() {
            n if n >= 3 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    assert_eq!(upgrade_status(&gw, &second.token()).await, 101);
}

#[tokio::test]
async fn a_reload_keeps_the_fetched_keys_and_readiness() {
    let key = SigningKey::new("k1");
    let server = JwksServer::start("reload", 200, jwks_of(&[&key])).await;
    let gw = gateway(&server, "1h").await;
    await_ready(&gw).await;
    server.serve(500, "down".into());
    let yaml = config(&server, "1h", &server.ca_path());
    let config = wsgate::config::Config::from_yaml_str_with_env(&yaml, "test.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    gw.gw.reload(config).await;
    assert_eq!(admin_get(&gw, "/readyz").await.0, 200);
    assert_eq!(upgrade_status(&gw, &key.token()).await, 101);
    // The new fetcher fetched again (and failed): the carried-over keys stay.
    await_metric(
        &gw,
        "wsgate_jwks_refresh_total",
        &[("result", "error")],
        1.0,
    )
    .await;
    assert_eq!(upgrade_status(&gw, &key.token()).await, 101);
}
