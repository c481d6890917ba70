//! A route's admission: the `origins` allowlist and `auth` (`jwt` keys, sources and
//! claims; `api_keys`), with JWKS, CA and key files read through the injected reader.
//! `jwks_url` entries are checked (URL, `refresh`, `ca`) but never fetched here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Validator;
use crate::admission::origin::OriginPolicy;
use crate::admission::token::{
    ApiKeySource, ApiKeyVerifier, ApiKeys, JwtKeys, JwtRules, JwtVerifier, RemoteKeys, TokenSource,
};
use crate::config::file::{FileApiKeys, FileAuth, FileJwt};
use crate::config::files::read_text;
use crate::config::units::{DurationValue, Text, fmt_duration};
use crate::tls;

/// How often a `jwks_url` is fetched when `refresh` is not set (SPEC §2's example).
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// The shortest `refresh`: an identity provider is not to be polled in a tight loop.
pub const MIN_JWKS_REFRESH: Duration = Duration::from_secs(1);
use crate::config::{JwtAuth, KeyPath, RouteAdmission};

impl Validator<'_> {
    pub(super) fn route_admission(
        &mut self,
        origins: Option<&[Text]>,
        allow_missing: Option<bool>,
        auth: Option<FileAuth>,
        path: &KeyPath,
    ) -> RouteAdmission {
        let origins = match origins {
            None => OriginPolicy::any(),
            Some(list) => {
                let list: Vec<String> = list.iter().map(|t| t.value.trim().to_owned()).collect();
                OriginPolicy::new(&list, allow_missing.unwrap_or(false)).unwrap_or_else(|e| {
                    self.issue(&path.key("origins"), e);
                    OriginPolicy::any()
                })
            }
        };
        let (jwt, api_keys) = match auth {
            None => (None, None),
            Some(auth) => {
                let jwt = auth
                    .jwt
                    .and_then(|j| self.jwt(j, &path.key("auth").key("jwt")));
                let keys = auth
                    .api_keys
                    .and_then(|k| self.api_keys(k, &path.key("auth").key("api_keys")));
                (jwt, keys)
            }
        };
        RouteAdmission {
            origins,
            jwt,
            api_keys,
        }
    }

    fn jwt(&mut self, file: FileJwt, path: &KeyPath) -> Option<JwtAuth> {
        let before = self.issues.len();
        let from = file
            .from
            .unwrap_or_else(|| vec![Text::literal("header:Authorization")]);
        let mut sources = Vec::new();
        for (i, t) in from.iter().enumerate() {
            match t.value.trim().parse::<TokenSource>() {
                Ok(s) => sources.push(s),
                Err(e) => self.issue(&path.key("from").index(i), e),
            }
        }
        let mut keys = JwtKeys::new();
        let mut remote = Vec::new();
        for (i, k) in file.keys.unwrap_or_default().iter().enumerate() {
            let at = path.key("keys").index(i);
            if k.jwks_url.is_none() {
                for (key, set) in [("refresh", k.refresh.is_some()), ("ca", k.ca.is_some())] {
                    if set {
                        self.issue(&at.key(key), format!("`{key}` belongs to a `jwks_url` key"));
                    }
                }
            }
            match (&k.secret, &k.jwks_file, &k.jwks_url) {
                (Some(secret), None, None) => {
                    let alg = k.alg.as_ref().map_or("HS256", |a| a.value.trim());
                    if let Err(e) = keys.add_secret(alg, secret.value.as_bytes()) {
                        self.issue(&at, e);
                    }
                }
                (None, Some(file), None) => {
                    let loaded = read_text(self.read, Path::new(file.value.trim()))
                        .map_err(|e| format!("cannot read JWKS file {}: {e}", file.value.trim()))
                        .and_then(|json| keys.add_jwks(&json));
                    match loaded {
                        Ok(load) => {
                            for skipped in load.skipped {
                                self.warnings.push(format!("{at}: {skipped}"));
                            }
                        }
                        Err(e) => self.issue(&at.key("jwks_file"), e),
                    }
                }
                (None, None, Some(url)) => {
                    if k.alg.is_some() {
                        self.issue(
                            &at.key("alg"),
                            "a `jwks_url` key takes each key's algorithm from the document; remove `alg`".into(),
                        );
                    }
                    if let Some(source) = self.jwks_url(url, k.refresh, k.ca.as_ref(), &at) {
                        remote.push(source);
                    }
                }
                _ => self.issue(
                    &at,
                    "a key is one of `{ alg, secret }`, `{ jwks_file }` or `{ jwks_url, refresh, ca }`".into(),
                ),
            }
        }
        if keys.is_empty() && remote.is_empty() && self.issues.len() == before {
            self.issue(&path.key("keys"), "jwt needs at least one key: `{ alg: HS256, secret: \"${JWT_SECRET}\" }`, `{ jwks_file: ... }` or `{ jwks_url: https://... }`".into());
        }
        let rules = JwtRules {
            issuer: file.issuer.map(|t| t.value.trim().to_owned()),
            audience: file.audience.map(|t| t.value.trim().to_owned()),
            leeway: file.leeway.map_or(Duration::ZERO, |d| d.0),
            require_claims: file
                .require_claims
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v.value)))
                .collect(),
            require_exp: true,
        };
        let mut forward_claims = Vec::new();
        for (claim, header) in file.forward_claims.unwrap_or_default() {
            match http::HeaderName::from_bytes(header.value.trim().as_bytes()) {
                Ok(h) => forward_claims.push((claim, h)),
                Err(_) => self.issue(
                    &path.key("forward_claims").key(&claim),
                    format!("{} is not a valid header name", header.shown()),
                ),
            }
        }
        if self.issues.len() != before {
            return None;
        }
        let subprotocol = sources.contains(&TokenSource::Subprotocol);
        match JwtVerifier::with_remote(sources, keys, remote, rules) {
            Ok(verifier) => Some(JwtAuth {
                subprotocol,
                verifier,
                close_on_expiry: file.close_on_expiry.unwrap_or(false),
                forward_claims,
                strip_token: file.strip_token.unwrap_or(false),
            }),
            Err(e) => {
                self.issue(path, e);
                None
            }
        }
    }

    /// A `jwks_url` key: an `https` URL with a host, `refresh` (default
    /// [`DEFAULT_JWKS_REFRESH`], at least [`MIN_JWKS_REFRESH`]) and an optional `ca` read
    /// through the reader. Nothing is fetched here: `--check` needs no network.
    fn jwks_url(
        &mut self,
        url: &Text,
        refresh: Option<DurationValue>,
        ca: Option<&Text>,
        at: &KeyPath,
    ) -> Option<Arc<RemoteKeys>> {
        let before = self.issues.len();
        let uri = match url.value.trim().parse::<http::Uri>() {
            Ok(uri) if uri.scheme() == Some(&http::uri::Scheme::HTTPS) && uri.host().is_some() => {
                Some(uri)
            }
            Ok(_) => {
                self.issue(
                    &at.key("jwks_url"),
                    format!(
                        "{} must be an https:// URL with a host (keys are only fetched over TLS)",
                        url.shown()
                    ),
                );
                None
            }
            Err(e) => {
                self.issue(
                    &at.key("jwks_url"),
                    format!("{} is not a URL: {e}", url.shown()),
                );
                None
            }
        };
        let refresh = refresh.map_or(DEFAULT_JWKS_REFRESH, |d| d.0);
        if refresh < MIN_JWKS_REFRESH {
            self.issue(
                &at.key("refresh"),
                format!(
                    "`refresh` must be at least {}; e.g. `5m`",
                    fmt_duration(MIN_JWKS_REFRESH)
                ),
            );
        }
        let ca = ca.map(|t| t.value.trim().to_owned());
        let roots = ca.as_ref().and_then(|path| {
            tls::load_roots(self.read, Path::new(path))
                .map_err(|e| self.issue(&at.key("ca"), e))
                .ok()
        });
        let uri = uri?;
        if self.issues.len() != before {
            return None;
        }
        let tls = match tls::client_config(roots, None) {
            Ok(tls) => tls,
            Err(e) => {
                self.issue(at, e);
                return None;
            }
        };
        let source = RemoteKeys::new(uri, refresh, ca, tls);
        if let Some(shared) = self.jwks_urls.iter().find(|s| s.same_source(&source)) {
            return Some(shared.clone());
        }
        let source = Arc::new(source);
        self.jwks_urls.push(source.clone());
        Some(source)
    }

    fn api_keys(&mut self, file: FileApiKeys, path: &KeyPath) -> Option<ApiKeyVerifier> {
        let source = match (&file.header, &file.query) {
            (Some(h), None) => format!("header:{}", h.value.trim()),
            (None, Some(q)) => format!("query:{}", q.value.trim()),
            _ => {
                self.issue(
                    path,
                    "api_keys needs exactly one of `header: NAME` or `query: NAME`".into(),
                );
                return None;
            }
        };
        let source = match source.parse::<ApiKeySource>() {
            Ok(s) => s,
            Err(e) => {
                self.issue(path, e);
                return None;
            }
        };
        let Some(file_path) = file.keys_file else {
            self.issue(
                &path.key("keys_file"),
                "api_keys needs `keys_file`: one SHA-256 hex digest per line".into(),
            );
            return None;
        };
        let keys = read_text(self.read, Path::new(file_path.value.trim()))
            .map_err(|e| format!("cannot read {}: {e}", file_path.value.trim()))
            .and_then(|text| ApiKeys::parse(&text));
        match keys {
            Ok(keys) => Some(ApiKeyVerifier::new(source, keys)),
            Err(e) => {
                self.issue(&path.key("keys_file"), e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::config::files::MemoryFiles;

    /// MINIMAL whose route checks a JWT against a JWKS file and an API key against a
    /// key file, both at paths that exist nowhere on disk.
    fn with_auth_files() -> String {
        MINIMAL.replace(
            "    upstream: echo\n",
            "    upstream: echo\n    auth:\n      jwt: { keys: [{ jwks_file: /in-memory/jwks.json }] }\n      api_keys: { header: X-Api-Key, keys_file: /in-memory/keys.txt }\n",
        )
    }

    #[test]
    fn jwks_and_api_key_files_come_from_the_reader() {
        // An Ed25519 public key (32 zero bytes; never used to verify here).
        let jwks = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}"#;
        let digest = "# one key\n".to_string() + &"ab".repeat(32) + "\n";
        let files = MemoryFiles::new()
            .with("/in-memory/jwks.json", jwks)
            .with("/in-memory/keys.txt", digest);
        let config = load_from(&with_auth_files(), &files).unwrap_or_else(|e| panic!("{e}"));
        let admission = &config.routes[0].admission;
        assert!(admission.jwt.is_some());
        assert!(admission.api_keys.is_some());
    }

    /// MINIMAL whose route checks a JWT against the given `keys` entries (YAML flow).
    fn with_keys(keys: &str) -> String {
        MINIMAL.replace(
            "    upstream: echo\n",
            &format!("    upstream: echo\n    auth:\n      jwt: {{ keys: [{keys}] }}\n"),
        )
    }

    /// A CA certificate (PEM) generated here.
    fn ca_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["idp-ca.test".to_owned()])
            .map(|c| c.cert.pem())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_jwks_url_with_its_ca_validates_without_any_fetch() {
        let files = MemoryFiles::new().with("/in-memory/idp-ca.crt", ca_pem());
        let yaml = with_keys(
            r#"{ jwks_url: "https://idp.example.com/jwks.json", refresh: 2m, ca: /in-memory/idp-ca.crt }"#,
        );
        let config = load_from(&yaml, &files).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.jwks_urls.len(), 1);
        let source = &config.jwks_urls[0];
        assert_eq!(source.uri, "https://idp.example.com/jwks.json");
        assert_eq!(source.refresh, std::time::Duration::from_secs(120));
        assert_eq!(source.ca.as_deref(), Some("/in-memory/idp-ca.crt"));
        assert!(!source.is_fetched(), "validation fetches nothing");
        let jwt = config.routes[0]
            .admission
            .jwt
            .as_ref()
            .map(|j| j.verifier.remote_keys().len());
        assert_eq!(jwt, Some(1));
    }

    #[test]
    fn refresh_defaults_to_five_minutes_and_routes_share_one_source() {
        let yaml = with_keys(r#"{ jwks_url: "https://idp.example.com/jwks.json" }"#);
        let second = "  - name: other\n    match: { path_prefix: /other }\n    upstream: echo\n    auth: { jwt: { keys: [{ jwks_url: \"https://idp.example.com/jwks.json\" }] } }\n";
        let config = load_from(&format!("{yaml}{second}"), &MemoryFiles::new())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.jwks_urls.len(), 1, "one fetcher for the shared URL");
        assert_eq!(config.jwks_urls[0].refresh, super::DEFAULT_JWKS_REFRESH);
        assert!(config.jwks_urls[0].ca.is_none());
    }

    #[test]
    fn bad_jwks_url_entries_are_located() {
        for (keys, path, words) in [
            (
                r#"{ jwks_url: "http://idp.example.com/jwks.json" }"#,
                "routes[0].auth.jwt.keys[0].jwks_url",
                "https://",
            ),
            (
                r#"{ jwks_url: "/jwks.json" }"#,
                "routes[0].auth.jwt.keys[0].jwks_url",
                "https://",
            ),
            (
                r#"{ jwks_url: "https://idp.example.com/", refresh: 500ms }"#,
                "routes[0].auth.jwt.keys[0].refresh",
                "at least 1s",
            ),
            (
                r#"{ jwks_url: "https://idp.example.com/", ca: /nowhere/ca.crt }"#,
                "routes[0].auth.jwt.keys[0].ca",
                "/nowhere/ca.crt",
            ),
            (
                r#"{ alg: HS256, secret: s3cr3t, refresh: 5m }"#,
                "routes[0].auth.jwt.keys[0].refresh",
                "jwks_url",
            ),
            (
                r#"{ jwks_file: /in-memory/jwks.json, jwks_url: "https://idp.example.com/" }"#,
                "routes[0].auth.jwt.keys[0]",
                "one of",
            ),
        ] {
            let errors = errors_from(&with_keys(keys), &MemoryFiles::new());
            assert!(
                errors
                    .iter()
                    .any(|e| e.path == path && e.message.contains(words)),
                "{keys}: {errors:#?}"
            );
        }
    }

    #[test]
    fn unreadable_auth_files_are_located_like_missing_ones() {
        let errors = errors_from(&with_auth_files(), &MemoryFiles::new());
        let got: Vec<(&str, bool)> = errors
            .iter()
            .map(|e| (e.path.as_str(), e.line > 0))
            .collect();
        assert_eq!(
            got,
            [
                ("routes[0].auth.jwt.keys[0].jwks_file", true),
                ("routes[0].auth.api_keys.keys_file", true)
            ],
            "{errors:#?}"
        );
        assert!(
            errors[0]
                .message
                .starts_with("cannot read JWKS file /in-memory/jwks.json: ")
        );
        assert!(
            errors[1]
                .message
                .starts_with("cannot read /in-memory/keys.txt: ")
        );
    }
}
