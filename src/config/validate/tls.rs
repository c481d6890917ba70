//! `tls` of listeners and upstreams: certificates, keys and CA bundles are loaded and
//! checked now (so `--check` and reload catch a broken file before it is served).

use std::path::Path;

use super::Validator;
use crate::config::file::{FileListenerTls, FileUpstreamTls};
use crate::config::{KeyPath, ListenerTls, UpstreamTls};
use crate::tls::tickets::{SharedKeys, Tickets};
use crate::tls::{self, MinVersion};

impl Validator<'_> {
    /// Loads and checks a listener's certificates now, so that `--check` and reload catch
    /// a broken file before it is served.
    pub(super) fn listener_tls(
        &mut self,
        file: FileListenerTls,
        path: &KeyPath,
    ) -> Option<ListenerTls> {
        let before = self.issues.len();
        let min = match file.min_version.as_ref().map(|t| t.value.trim()) {
            None | Some("1.2") => MinVersion::Tls12,
            Some("1.3") => MinVersion::Tls13,
            Some(_) => {
                self.issue(
                    &path.key("min_version"),
                    "min_version must be \"1.2\" or \"1.3\"".into(),
                );
                MinVersion::Tls12
            }
        };
        let self_signed = file.self_signed == Some(true);
        let mut certificates = Vec::new();
        for (i, c) in file.certificates.unwrap_or_default().iter().enumerate() {
            let at = path.key("certificates").index(i);
            match tls::load_pair(
                self.read,
                Path::new(c.cert.value.trim()),
                Path::new(c.key.value.trim()),
            ) {
                Ok(loaded) => {
                    if let Some(w) = loaded.expiry_warning() {
                        self.warnings.push(format!("{at}: {w}"));
                    }
                    certificates.push(loaded);
                }
                Err(e) => self.issue(&at.key("cert"), e),
            }
        }
        if self_signed {
            match tls::self_signed() {
                Ok(c) => certificates.push(c),
                Err(e) => self.issue(&path.key("self_signed"), e),
            }
            self.warnings.push(match tls::dev_ca() {
                Some(ca) => format!(
                    "{path}: serving a localhost certificate of the local development CA {}; clients trust it only once told to (the start-up log prints how); use real certificates in production (see certs/README.md)",
                    ca.cert_path
                ),
                None => format!(
                    "{path}: serves a localhost certificate of the local development CA (made or found at start-up in $WSGATE_DATA_DIR, else $XDG_DATA_HOME/wsgate or ~/.local/share/wsgate; without it, a self-signed one no client trusts); clients trust it once told to (the start-up log prints how); use real certificates in production (see certs/README.md)"
                ),
            });
        }
        if certificates.is_empty() && self.issues.len() == before {
            self.issue(
                path,
                "tls needs `certificates: [{ cert: ..., key: ... }]` or `self_signed: true`".into(),
            );
        }
        let client_ca = file.client_ca.as_ref().and_then(|ca| {
            tls::load_roots(self.read, Path::new(ca.value.trim()))
                .map_err(|e| self.issue(&path.key("client_ca"), e))
                .ok()
        });
        let resumption = match (file.session_tickets, &file.ticket_keys) {
            (Some(false), Some(_)) => {
                self.issue(
                    &path.key("ticket_keys"),
                    "ticket_keys needs session_tickets (remove `session_tickets: false` or the keys)"
                        .into(),
                );
                Tickets::Off
            }
            (Some(false), None) => Tickets::Off,
            (_, None) => Tickets::Rotating,
            (_, Some(file)) => {
                let at = path.key("ticket_keys");
                match (self.read)(Path::new(file.value.trim())) {
                    Ok(bytes) => match SharedKeys::parse(&bytes) {
                        Ok(keys) => Tickets::Shared(std::sync::Arc::new(keys)),
                        Err(e) => {
                            self.issue(&at, format!("{}: {e}", file.value.trim()));
                            Tickets::Off
                        }
                    },
                    Err(e) => {
                        self.issue(&at, format!("{}: {e}", file.value.trim()));
                        Tickets::Off
                    }
                }
            }
        };
        if self.issues.len() != before {
            return None;
        }
        match tls::server_config(&certificates, min, client_ca.as_ref(), &resumption) {
            Ok(server) => Some(ListenerTls {
                server,
                certificates,
                self_signed,
                mtls: client_ca.is_some(),
            }),
            Err(e) => {
                self.issue(path, e);
                None
            }
        }
    }

    pub(super) fn upstream_tls(
        &mut self,
        file: FileUpstreamTls,
        path: &KeyPath,
    ) -> Option<UpstreamTls> {
        let before = self.issues.len();
        let roots = file.ca.as_ref().and_then(|ca| {
            tls::load_roots(self.read, Path::new(ca.value.trim()))
                .map_err(|e| self.issue(&path.key("ca"), e))
                .ok()
        });
        let identity = file.client_cert.as_ref().and_then(|c| {
            tls::load_client_identity(
                self.read,
                Path::new(c.cert.value.trim()),
                Path::new(c.key.value.trim()),
            )
            .map_err(|e| self.issue(&path.key("client_cert").key("cert"), e))
            .ok()
        });
        let sni = file.sni.as_ref().map(|s| s.value.trim().to_owned());
        if let (Some(name), Some(text)) = (&sni, &file.sni)
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            self.issue(
                &path.key("sni"),
                format!("{} is not a valid TLS server name", text.shown()),
            );
        }
        if self.issues.len() != before {
            return None;
        }
        match tls::client_config(roots, identity) {
            Ok(client) => Some(UpstreamTls { client, sni }),
            Err(e) => {
                self.issue(path, e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::config::Config;
    use crate::config::files::{MemoryFiles, no_files};

    type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

    /// MINIMAL whose listener serves `cert`/`key`, paths that exist nowhere on disk.
    fn tls_listener(cert: &str, key: &str) -> String {
        MINIMAL.replace(
            "  - bind: 127.0.0.1:8080\n",
            &format!(
                "  - bind: 127.0.0.1:8080\n    tls:\n      certificates: [{{ cert: {cert}, key: {key} }}]\n"
            ),
        )
    }

    /// A fresh self-signed certificate for `name`, as (cert PEM, key PEM).
    fn pem_pair(name: &str) -> Result<(String, String)> {
        let generated = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
        Ok((generated.cert.pem(), generated.signing_key.serialize_pem()))
    }

    #[test]
    fn listener_certificates_come_from_the_reader_not_the_disk() -> Result {
        let (cert, key) = pem_pair("mem.test")?;
        let files = MemoryFiles::new()
            .with("/in-memory/cert.pem", cert)
            .with("/in-memory/key.pem", key);
        let text = tls_listener("/in-memory/cert.pem", "/in-memory/key.pem");
        let config = load_from(&text, &files).map_err(|e| e.to_string())?;
        let tls = config.listeners[0].tls.as_ref().ok_or("no tls")?;
        assert_eq!(tls.certificates[0].names, ["mem.test"]);
        assert!(!tls.self_signed && !tls.mtls);
        Ok(())
    }

    #[test]
    fn upstream_ca_and_client_certificate_come_from_the_reader() -> Result {
        let (ca, _) = pem_pair("ca.test")?;
        let (cert, key) = pem_pair("client.test")?;
        let files = MemoryFiles::new()
            .with("/in-memory/ca.pem", ca)
            .with("/in-memory/client.pem", cert)
            .with("/in-memory/client.key", key);
        let text = MINIMAL.replace(
            "echo: { builtin: echo }",
            "echo: { backends: [{ addr: \"a:1\" }], tls: { ca: /in-memory/ca.pem, client_cert: { cert: /in-memory/client.pem, key: /in-memory/client.key } } }",
        );
        let config = load_from(&text, &files).map_err(|e| e.to_string())?;
        assert!(config.upstreams["echo"].tls.is_some());
        Ok(())
    }

    /// Validation cannot tell a refused read from a missing file: the same key path,
    /// position and message up to the I/O error's own text.
    #[test]
    fn a_refusing_reader_gives_the_same_located_error_as_a_missing_file() {
        let text = tls_listener(
            "/nonexistent/wsgate-cert.pem",
            "/nonexistent/wsgate-key.pem",
        );
        let on_disk = errors_of(&text);
        let in_memory = errors_from(&text, &MemoryFiles::new());
        let refused = Config::from_yaml_str_with(&text, "test.yaml", &env, &no_files)
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        let prefix = "cannot read certificates from /nonexistent/wsgate-cert.pem: I/O error: ";
        for errors in [&on_disk, &in_memory, &refused] {
            assert_eq!(errors.len(), 1, "{errors:#?}");
            let e = &errors[0];
            assert_eq!(
                (e.file.as_str(), e.path.as_str(), e.line, e.column),
                ("test.yaml", "listeners[0].tls.certificates[0].cert", 4, 30),
                "{e}"
            );
            assert!(e.message.starts_with(prefix), "{e}");
        }
    }

    #[test]
    fn not_supported_key_is_located() {
        let text = MINIMAL.replace(
            "  - bind: 127.0.0.1:8080\n",
            "  - bind: 127.0.0.1:8080\n    tls:\n      min_version: \"1.3\"\n",
        );
        assert_one_error(&text, "listeners[0].tls", 4, 7, "tls needs `certificates");
    }
}
