//! A route's admission: the `origins` allowlist and `auth` (`jwt` keys, sources and
//! claims; `api_keys`), with JWKS and key files read through the injected reader.

use std::path::Path;
use std::time::Duration;

use super::Validator;
use crate::admission::origin::OriginPolicy;
use crate::admission::token::{
    ApiKeySource, ApiKeyVerifier, ApiKeys, JwtKeys, JwtRules, JwtVerifier, TokenSource,
};
use crate::config::file::{FileApiKeys, FileAuth, FileJwt};
use crate::config::files::read_text;
use crate::config::units::Text;
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
        for (i, k) in file.keys.unwrap_or_default().iter().enumerate() {
            let at = path.key("keys").index(i);
            match (&k.secret, &k.jwks_file) {
                (Some(secret), None) => {
                    let alg = k.alg.as_ref().map_or("HS256", |a| a.value.trim());
                    if let Err(e) = keys.add_secret(alg, secret.value.as_bytes()) {
                        self.issue(&at, e);
                    }
                }
                (None, Some(file)) => {
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
                _ => self.issue(
                    &at,
                    "a key is either `{ alg, secret }` or `{ jwks_file }`".into(),
                ),
            }
        }
        if keys.is_empty() && self.issues.len() == before {
            self.issue(&path.key("keys"), "jwt needs at least one key: `{ alg: HS256, secret: \"${JWT_SECRET}\" }` or `{ jwks_file: ... }`".into());
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
        match JwtVerifier::new(sources, keys, rules) {
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
