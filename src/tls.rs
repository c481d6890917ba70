//! TLS with rustls and its `ring` provider (a pure-Rust/asm build: no cmake or C toolchain
//! beyond the one Rust needs). Owns loading certificates and keys from PEM (or generating a
//! localhost certificate in memory), picking a certificate by SNI, building the listener
//! and upstream configurations, and logging handshake failures without letting a scanner
//! flood the log. It does no I/O of its own: certificate and key files come through the
//! reader the caller passes (config validation's injected file reader).

pub mod tickets;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Certificates expiring within this window produce a warning at load (`--check` too).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// ALPN: WebSocket upgrades ride HTTP/1.1 only.
const ALPN_HTTP11: &[u8] = b"http/1.1";

pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// A certificate chain with its key, and what SNI selection and `--check` need to know.
#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// DNS names and IP addresses of the leaf (SANs, else the subject CN), lower-cased;
    /// wildcards kept as `*.example.com`.
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

impl LoadedCert {
    /// A warning if the certificate expires within [`EXPIRY_WARNING`].
    pub fn expiry_warning(&self) -> Option<String> {
        let left = self
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        (left < EXPIRY_WARNING).then(|| {
            format!(
                "certificate for {} expires in {} days",
                self.names.join(", "),
                left.as_secs() / 86_400
            )
        })
    }
}

/// Reads a file whole; the same shape as `config::files::ReadFile`, spelled out so that
/// `tls` imports nothing of `config`.
pub type ReadFile<'a> = dyn Fn(&Path) -> io::Result<Vec<u8>> + 'a;

/// Loads a PEM chain (leaf first, intermediates after) and its PEM key (PKCS#8, PKCS#1 or
/// SEC1: RSA, ECDSA, Ed25519) through `read`. Refuses an expired certificate or a key that
/// is not the leaf's.
pub fn load_pair(
    read: &ReadFile<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<LoadedCert, String> {
    read_pair(read, cert_path, key_path).map(|(loaded, _)| loaded)
}

/// [`load_pair`], also returning the chain and key as read (an upstream client identity
/// needs them in that form).
fn read_pair(
    read: &ReadFile<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(LoadedCert, ClientIdentity), String> {
    let chain = pem_items::<CertificateDer<'static>>(read, cert_path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert_path.display()));
    }
    let key = read(key_path)
        .map_err(pem::Error::Io)
        .and_then(|bytes| PrivateKeyDer::from_pem_reader(bytes.as_slice()))
        .map_err(|e| format!("cannot read a private key from {}: {e}", key_path.display()))?;
    let loaded = certified(chain.clone(), key.clone_key())?;
    if loaded.not_after < SystemTime::now() {
        return Err(format!("certificate {} has expired", cert_path.display()));
    }
    Ok((loaded, (chain, key)))
}

/// Every PEM item of type `T` in the file at `path`. The bytes go through the same reader
/// iterator rustls-pki-types runs over a file, and a failed read becomes its `Io` error,
/// so messages match what opening the file directly gave.
fn pem_items<T: PemObject>(read: &ReadFile<'_>, path: &Path) -> Result<Vec<T>, pem::Error> {
    let bytes = read(path).map_err(pem::Error::Io)?;
    T::pem_reader_iter(bytes.as_slice()).collect()
}

/// The names a development certificate (`self_signed: true`) is valid for.
const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate for `localhost`, `127.0.0.1` and `::1`, generated in memory for
/// development: signed by the local development CA when one is installed
/// ([`install_dev_ca`], what the binary does at start-up), else self-signed (`--check`,
/// tests in process).
pub fn self_signed() -> Result<LoadedCert, String> {
    let names: Vec<String> = DEV_NAMES.iter().map(|n| (*n).to_owned()).collect();
    let fail = |e: rcgen::Error| format!("cannot generate a certificate: {e}");
    if let Some(ca) = DEV_CA.get() {
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let mut params = rcgen::CertificateParams::new(names).map_err(fail)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca.issuer).map_err(fail)?;
        let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_owned())?;
        return certified(vec![cert.der().clone(), ca.cert.clone()], key);
    }
    let generated = rcgen::generate_simple_self_signed(names).map_err(fail)?;
    let key =
        PrivateKeyDer::try_from(generated.signing_key.serialize_der()).map_err(|e| e.to_owned())?;
    certified(vec![generated.cert.der().clone()], key)
}

/// The local development CA: it signs every `self_signed` certificate of this process, so
/// a client that trusts its certificate file once trusts every restart (as Caddy's local
/// CA). Files are the caller's business (`crate::devca`); this holds it in memory.
pub struct DevCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: CertificateDer<'static>,
    /// Where the CA's certificate is, for messages.
    pub cert_path: String,
}

static DEV_CA: std::sync::OnceLock<DevCa> = std::sync::OnceLock::new();

/// The CA's parameters, rebuilt from its key alone: its name carries the key's
/// identifier, so two machines' CAs never share a name, and the issuer of certificates
/// signed with a reloaded key is the name in the certificate file written the first time.
fn dev_ca_params(key: &rcgen::KeyPair) -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let id: String = params
        .key_identifier(key)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("wsgate local development CA {id}"),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "wsgate development");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A new development CA: (its certificate PEM, its private key PEM).
pub fn new_dev_ca() -> Result<(String, String), String> {
    let fail = |e: rcgen::Error| format!("cannot generate the development CA: {e}");
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = dev_ca_params(&key)
        .and_then(|p| p.self_signed(&key))
        .map_err(fail)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes the CA of `cert_pem` and `key_pem` sign every later [`self_signed`] certificate.
/// Refuses a key that is not the certificate's. Only the first call in a process counts.
pub fn install_dev_ca(cert_pem: &str, key_pem: &str, cert_path: &str) -> Result<(), String> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("development CA key: {e}"))?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("development CA certificate: {e}"))?;
    let params = dev_ca_params(&key).map_err(|e| e.to_string())?;
    let own_key = x509_parser::parse_x509_certificate(&cert)
        .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
        .map_err(|e| format!("development CA certificate: {e}"))?;
    if own_key != rcgen::PublicKeyData::der_bytes(&key) {
        return Err("the development CA key does not match its certificate".into());
    }
    let issuer = rcgen::Issuer::new(params, key);
    let _ = DEV_CA.set(DevCa {
        issuer,
        cert,
        cert_path: cert_path.to_owned(),
    });
    Ok(())
}

/// The installed development CA, if any.
pub fn dev_ca() -> Option<&'static DevCa> {
    DEV_CA.get()
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<LoadedCert, String> {
    let (names, not_after) = leaf_facts(&chain[0])?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not match the certificate".to_owned()
        }
        e => format!("unusable private key: {e}"),
    })?;
    Ok(LoadedCert {
        key: Arc::new(key),
        names,
        not_after,
    })
}

/// SAN names (else the CN) and expiry of a leaf certificate.
fn leaf_facts(der: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => names.push(n.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) => {
                    if let Some(ip) = ip_from_bytes(ip) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty()
        && let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
    {
        names.push(cn.to_ascii_lowercase());
    }
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok((names, UNIX_EPOCH + Duration::from_secs(secs)))
}

fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// Loads a PEM bundle of CA certificates through `read`.
pub fn load_roots(read: &ReadFile<'_>, path: &Path) -> Result<RootCertStore, String> {
    let certs = pem_items::<CertificateDer<'static>>(read, path)
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{} holds no usable CA certificate", path.display()));
    }
    Ok(roots)
}

/// Picks a certificate by SNI: exact names first, then `*.` wildcards (one label), then
/// the first certificate (also for clients that send no SNI).
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    pub fn new(certs: &[LoadedCert]) -> Option<SniResolver> {
        let default = certs.first()?.key.clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard
                        .entry(suffix.to_owned())
                        .or_insert_with(|| c.key.clone()),
                    None => exact.entry(name.clone()).or_insert_with(|| c.key.clone()),
                };
            }
        }
        Some(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        let parent = name.split_once('.').map(|(_, rest)| rest);
        parent
            .and_then(|p| self.wildcard.get(p))
            .unwrap_or(&self.default)
            .clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// Lowest TLS version a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// A listener's rustls configuration: SNI resolver, ALPN `http/1.1`, optional mTLS,
/// session tickets.
pub fn server_config(
    certs: &[LoadedCert],
    min: MinVersion,
    client_ca: Option<&RootCertStore>,
    resumption: &tickets::Tickets,
) -> Result<Arc<ServerConfig>, String> {
    let resolver = SniResolver::new(certs).ok_or("no certificate configured")?;
    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(roots) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
                    .build()
                    .map_err(|e| format!("client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    match resumption {
        tickets::Tickets::Off => {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        // A resumed handshake skips client authentication (the session keeps the first
        // one's): a ticket sealed by a shared ticketer for a listener without `client_ca`
        // would pass an mTLS one. mTLS listeners resume only from their own session cache
        // (this config's, so a reload that changes `client_ca` starts it afresh).
        _ if client_ca.is_some() => {}
        tickets::Tickets::Rotating => config.ticketer = tickets::rotating()?,
        tickets::Tickets::Shared(keys) => config.ticketer = keys.clone(),
    }
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// A client certificate for upstream mTLS: the chain and its key, as rustls's client
/// builder takes them (checked to match, like a listener's).
pub type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Loads an upstream client certificate and its key through `read`, checked like a
/// listener's ([`load_pair`]).
pub fn load_client_identity(
    read: &ReadFile<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<ClientIdentity, String> {
    read_pair(read, cert_path, key_path).map(|(_, identity)| identity)
}

/// An upstream's rustls configuration: its CA bundle (or the bundled webpki roots) and an
/// optional client certificate.
pub fn client_config(
    roots: Option<RootCertStore>,
    identity: Option<ClientIdentity>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = roots.unwrap_or_else(|| RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Logs a failed TLS handshake (the `total` so far comes from the metrics), at most about
/// ten lines per second so a scanner cannot flood the log (the count stays exact).
pub fn log_handshake_failure(peer: SocketAddr, reason: &dyn std::fmt::Display, total: u64) {
    if crate::log_budget::warn_budget() {
        tracing::warn!(client_ip = %peer.ip(), client_port = peer.port(), %reason, failures_total = total, "TLS handshake failed");
    }
}

/// Logs a TLS handshake that failed with an I/O error: when the client hung up or sent a
/// certificate alert, the line says that it most likely rejected the certificate (the
/// usual first wss:// failure with a development certificate) and how to trust it.
pub fn log_handshake_error(peer: SocketAddr, error: &io::Error, total: u64) {
    if !crate::log_budget::warn_budget() {
        return;
    }
    let Some(hint) = rejected_certificate(error) else {
        tracing::warn!(client_ip = %peer.ip(), client_port = peer.port(), reason = %error, failures_total = total, "TLS handshake failed");
        return;
    };
    tracing::warn!(client_ip = %peer.ip(), client_port = peer.port(), reason = %error, failures_total = total, "TLS handshake failed: the client most likely rejected the certificate{hint}");
}

/// `Some(advice)` when `error` looks like a client refusing the server's certificate: an
/// end of stream mid-handshake (Python, curl and browsers just hang up) or a certificate
/// alert (rustls, Go, Java).
fn rejected_certificate(error: &io::Error) -> Option<String> {
    use rustls::AlertDescription as A;
    let alert = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(
                    A::BadCertificate
                        | A::UnknownCA
                        | A::CertificateUnknown
                        | A::CertificateExpired
                        | A::UnsupportedCertificate
                )
            )
        });
    if !alert && error.kind() != io::ErrorKind::UnexpectedEof {
        return None;
    }
    // A connection that sent nothing before closing ends the same way.
    let or_probe = if alert {
        ""
    } else {
        "; or it was a port check that sent nothing"
    };
    let advice = match DEV_CA.get() {
        Some(ca) => format!(
            " (it is signed by the development CA {0}: trust that file, e.g. SSL_CERT_FILE={0}, curl --cacert {0}, or import it as an authority in the browser)",
            ca.cert_path
        ),
        None => " (is it signed by a CA the client trusts, and does it name the host the client asked for?)".to_owned(),
    };
    Some(format!("{advice}{or_probe}"))
}

/// Protocol version as the access log writes it.
pub fn version_label(v: Option<rustls::ProtocolVersion>) -> Option<&'static str> {
    match v? {
        rustls::ProtocolVersion::TLSv1_3 => Some("1.3"),
        rustls::ProtocolVersion::TLSv1_2 => Some("1.2"),
        _ => Some("other"),
    }
}

/// The subject of a verified client certificate, as `CN=…, O=…`.
pub fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

    fn cert_for(names: &[&str]) -> Result<LoadedCert> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let generated = rcgen::generate_simple_self_signed(names)?;
        let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())?;
        Ok(certified(vec![generated.cert.der().clone()], key)?)
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() -> Result {
        let a = cert_for(&["a.example.com"])?;
        let w = cert_for(&["*.example.org"])?;
        let r = SniResolver::new(&[a.clone(), w.clone()]).ok_or("no resolver")?;
        assert!(Arc::ptr_eq(&r.pick(Some("A.Example.com")), &a.key));
        assert!(Arc::ptr_eq(&r.pick(Some("x.example.org")), &w.key));
        assert!(
            Arc::ptr_eq(&r.pick(Some("x.y.example.org")), &a.key),
            "a wildcard covers one label only"
        );
        assert!(Arc::ptr_eq(&r.pick(None), &a.key));
        assert!(Arc::ptr_eq(&r.pick(Some("unknown.test")), &a.key));
        Ok(())
    }

    #[test]
    fn self_signed_covers_localhost_and_loopback() -> Result {
        let c = self_signed()?;
        assert_eq!(c.names, ["localhost", "127.0.0.1", "::1"]);
        assert!(c.expiry_warning().is_none());
        Ok(())
    }

    #[test]
    fn certificates_close_to_expiry_warn_and_expired_ones_are_refused() -> Result {
        let soon = time::OffsetDateTime::now_utc() + time::Duration::days(3);
        let mut params = rcgen::CertificateParams::new(vec!["soon.test".to_string()])?;
        params.not_after = soon;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let der = PrivateKeyDer::try_from(key.serialize_der())?;
        let loaded = certified(vec![cert.der().clone()], der)?;
        let warning = loaded.expiry_warning().ok_or("no warning")?;
        assert!(
            warning.contains("soon.test") && warning.contains("expires in 2 days"),
            "{warning}"
        );
        let dir = std::env::temp_dir().join(format!("wsgate-expired-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
        params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let old = params.self_signed(&key)?;
        std::fs::write(dir.join("c.pem"), old.pem())?;
        std::fs::write(dir.join("k.pem"), key.serialize_pem())?;
        let err = load_pair(
            &|p| std::fs::read(p),
            &dir.join("c.pem"),
            &dir.join("k.pem"),
        )
        .err()
        .ok_or("an expired certificate loaded")?;
        assert!(err.contains("expired"), "{err}");
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }

    #[test]
    fn mismatched_key_is_refused() -> Result {
        let a = rcgen::generate_simple_self_signed(vec!["a".to_string()])?;
        let b = rcgen::generate_simple_self_signed(vec!["b".to_string()])?;
        let key = PrivateKeyDer::try_from(b.signing_key.serialize_der())?;
        let err = certified(vec![a.cert.der().clone()], key)
            .err()
            .ok_or("a foreign key was accepted")?;
        assert!(err.contains("does not match"), "{err}");
        Ok(())
    }
}
