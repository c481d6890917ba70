//! JWT verification keys (`auth.jwt.keys`): HMAC secrets and JWKS documents, each key
//! bound to the one algorithm it may verify (see the parent module's rules).

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Verification keys, each bound to the one algorithm it may verify.
#[derive(Clone, Default)]
pub struct JwtKeys {
    keys: Vec<JwtKey>,
}

#[derive(Clone)]
pub(super) struct JwtKey {
    pub(super) alg: Algorithm,
    kid: Option<String>,
    pub(super) key: DecodingKey,
}

/// What [`JwtKeys::add_jwks`] did: how many keys it took, and which it skipped and why
/// (for an operational log line; key ids only, never key material).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksLoad {
    pub loaded: usize,
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets must not reach a log through `{:?}`: algorithms and key ids only.
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.alg, k.kid.as_deref())))
            .finish()
    }
}

impl JwtKeys {
    /// No keys yet.
    pub fn new() -> Self {
        JwtKeys::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no key (then nothing verifies).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds an HMAC secret (`{ alg: HS256, secret: … }`); `alg` must be HS256/384/512.
    pub fn add_secret(&mut self, alg: &str, secret: &[u8]) -> Result<(), String> {
        let alg = match alg {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            _ => {
                return Err(format!(
                    "`secret` keys are HMAC: alg must be HS256, HS384 or HS512, not {alg:?} \
                     (put public keys in a `jwks_file`)"
                ));
            }
        };
        if secret.is_empty() {
            return Err("empty secret (is the environment variable set?)".into());
        }
        self.keys.push(JwtKey {
            alg,
            kid: None,
            key: DecodingKey::from_secret(secret),
        });
        Ok(())
    }

    /// Adds the signature keys of a JWKS document (RS256/384/512, PS256/384/512, ES256,
    /// ES384, EdDSA). Encryption keys and unsupported algorithms are skipped and reported;
    /// symmetric (`oct`) keys are refused, as is a document with no usable key.
    pub fn add_jwks(&mut self, json: &str) -> Result<JwksLoad, String> {
        self.add_jwks_document(json, false)
    }

    /// [`add_jwks`](Self::add_jwks) for a document fetched from an identity provider: a key
    /// that cannot be used (an `oct` key, an `alg` its type does not allow) is skipped and
    /// reported instead of failing the document, so one bad entry cannot stop every
    /// rotation and keep a retired key in service.
    pub fn add_fetched_jwks(&mut self, json: &str) -> Result<JwksLoad, String> {
        self.add_jwks_document(json, true)
    }

    fn add_jwks_document(&mut self, json: &str, skip_bad: bool) -> Result<JwksLoad, String> {
        let set: JwkSet = serde_json::from_str(json)
            .map_err(|e| format!("not a JWKS document (`{{\"keys\": [...]}}`): {e}"))?;
        let mut load = JwksLoad::default();
        for (i, jwk) in set.keys.iter().enumerate() {
            let name = jwk
                .common
                .key_id
                .clone()
                .unwrap_or_else(|| format!("keys[{i}]"));
            match jwk_key(jwk) {
                Ok(Some(key)) => {
                    self.keys.push(key);
                    load.loaded += 1;
                }
                Ok(None) => load.skipped.push(name),
                Err(e) if skip_bad => load.skipped.push(format!("{name} ({e})")),
                Err(e) => return Err(format!("key {name}: {e}")),
            }
        }
        if load.loaded == 0 {
            return Err("no usable signature key in the JWKS document".into());
        }
        Ok(load)
    }

    /// Whether a key has this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|key| key.kid.as_deref() == Some(kid))
    }

    /// The keys a token with this header may be tried against (see the module doc);
    /// `kid_known` says whether any key set of the route has the token's `kid`.
    pub(super) fn candidates(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        kid_known: bool,
    ) -> impl Iterator<Item = &JwtKey> {
        self.keys.iter().filter(move |key| {
            let kid_ok = match (kid, kid_known) {
                (Some(k), true) => key.kid.as_deref() == Some(k),
                (Some(_), false) => key.kid.is_none(),
                (None, _) => true,
            };
            kid_ok && key.alg == alg
        })
    }
}

/// One JWK → a key bound to its algorithm; `Ok(None)` for keys that are not ours to use
/// (encryption keys, unsupported curves or algorithms).
fn jwk_key(jwk: &Jwk) -> Result<Option<JwtKey>, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Ok(None);
    }
    let alg = match jwk.common.key_algorithm {
        Some(a) => match Algorithm::try_from(a) {
            Ok(alg) => Some(alg),
            Err(_) => return Ok(None),
        },
        None => None,
    };
    let Some(alg) = key_algorithm(&jwk.algorithm, alg)? else {
        return Ok(None);
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(Some(JwtKey {
        alg,
        kid: jwk.common.key_id.clone(),
        key,
    }))
}

/// The algorithm a key may verify: the declared `alg` when it fits the key type, or the
/// one its type implies. A declared `alg` of another family (e.g. `HS256` on an RSA key)
/// is an error: that is exactly the algorithm-confusion attack.
fn key_algorithm(
    params: &AlgorithmParameters,
    declared: Option<Algorithm>,
) -> Result<Option<Algorithm>, String> {
    use Algorithm::*;
    let (fits, implied): (&[Algorithm], Option<Algorithm>) = match params {
        // RSA keys without `alg` (Azure AD publishes them so) are taken as RS256, the
        // algorithm every OIDC provider must support.
        AlgorithmParameters::RSA(_) => (&[RS256, RS384, RS512, PS256, PS384, PS512], Some(RS256)),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => (&[ES256], Some(ES256)),
            EllipticCurve::P384 => (&[ES384], Some(ES384)),
            _ => return Ok(None),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => (&[EdDSA], Some(EdDSA)),
            _ => return Ok(None),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (`oct`) keys do not belong in a JWKS file; \
                        configure them as `{ alg: HS256, secret: ... }`"
                .into());
        }
        _ => return Ok(None),
    };
    match declared {
        Some(alg) if fits.contains(&alg) => Ok(Some(alg)),
        Some(alg) => Err(format!("`alg` {alg:?} does not fit the key type")),
        None => Ok(implied),
    }
}
