//! Tests for the `token` module. Every private key is generated at test time (rcgen for EC and
//! Ed25519, `openssl genrsa` for RSA; the RSA tests skip, saying so, when `openssl` is
//! missing). No key material is committed.

use std::str::FromStr;
use std::time::Duration;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use proptest::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::jwt::claim_matches;
use super::sources::{bearer_subprotocol, find_token};
use super::*;
use crate::http_util::strip_cookie;

const NOW: u64 = 1_800_000_000;

// ----- helpers ---------------------------------------------------------------------------

fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(
            HeaderName::from_str(n).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn sources(list: &[&str]) -> Vec<TokenSource> {
    list.iter().map(|s| s.parse().expect("source")).collect()
}

fn claims() -> Value {
    json!({"sub": "user-42", "iss": "https://auth.example.com/", "aud": "chat",
           "exp": NOW + 600, "nbf": NOW - 10, "scope": "chat read"})
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, key).expect("sign")
}

fn hs_keys(secret: &[u8]) -> JwtKeys {
    let mut k = JwtKeys::new();
    k.add_secret("HS256", secret).expect("secret");
    k
}

fn verifier(keys: JwtKeys, rules: JwtRules) -> JwtVerifier {
    JwtVerifier::new(sources(&["header:Authorization"]), keys, rules).expect("verifier")
}

fn strict_rules() -> JwtRules {
    JwtRules {
        issuer: Some("https://auth.example.com/".into()),
        audience: Some("chat".into()),
        leeway: Duration::from_secs(30),
        require_claims: vec![("scope".into(), json!("chat"))],
        require_exp: true,
    }
}

/// An EC or Ed25519 private key (PKCS#8) and its public JWK.
struct TestKey {
    encoding: EncodingKey,
    jwk: Value,
}

fn ec_key(curve: &str, kid: &str) -> TestKey {
    let (alg, coord, jalg) = match curve {
        "P-256" => (&rcgen::PKCS_ECDSA_P256_SHA256, 32, "ES256"),
        _ => (&rcgen::PKCS_ECDSA_P384_SHA384, 48, "ES384"),
    };
    let kp = rcgen::KeyPair::generate_for(alg).expect("ec keygen");
    let point = kp.public_key_raw();
    TestKey {
        encoding: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: json!({"kty": "EC", "crv": curve, "kid": kid, "alg": jalg, "use": "sig",
                    "x": b64url(&point[1..1 + coord]), "y": b64url(&point[1 + coord..])}),
    }
}

fn ed_key(kid: &str) -> TestKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed keygen");
    TestKey {
        encoding: EncodingKey::from_ed_der(&kp.serialize_der()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                    "x": b64url(kp.public_key_raw())}),
    }
}

/// A fresh RSA key from `openssl genrsa`, or `None` (test skipped) without openssl.
fn rsa_key(kid: &str, alg: Algorithm) -> Option<(EncodingKey, Value, Vec<u8>)> {
    let out = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "2048"])
        .stderr(std::process::Stdio::null())
        .output();
    let pem = match out {
        Ok(o) if o.status.success() => o.stdout,
        _ => {
            eprintln!("SKIPPED: `openssl genrsa` unavailable, RSA test not run");
            return None;
        }
    };
    let enc = EncodingKey::from_rsa_pem(&pem).expect("rsa pem");
    let jwk = Jwk::from_encoding_key(&enc, alg).expect("rsa jwk");
    let mut jwk = serde_json::to_value(jwk).expect("jwk json");
    jwk["kid"] = json!(kid);
    let n = match &jwk["n"] {
        Value::String(n) => n.as_bytes().to_vec(),
        _ => Vec::new(),
    };
    Some((enc, jwk, n))
}

fn jwks(keys: &[&Value]) -> String {
    json!({ "keys": keys }).to_string()
}

fn bearer(token: &str) -> HeaderMap {
    headers(&[("authorization", &format!("Bearer {token}"))])
}

fn token_error(r: Result<Authorized, Refusal>) -> &'static str {
    match r {
        Err(Refusal::Token { error }) => error,
        other => panic!("expected a token refusal, got {other:?}"),
    }
}

// ----- sources -------------------------------------------------------------------------

#[test]
fn source_parsing() {
    assert_eq!("header:Authorization".parse(), Ok(TokenSource::Bearer));
    assert_eq!("header:authorization".parse(), Ok(TokenSource::Bearer));
    assert_eq!(
        "header:X-Token".parse(),
        Ok(TokenSource::Header(HeaderName::from_static("x-token")))
    );
    assert_eq!(
        "query:access_token".parse(),
        Ok(TokenSource::Query("access_token".into()))
    );
    assert_eq!(
        "cookie:token".parse(),
        Ok(TokenSource::Cookie("token".into()))
    );
    assert_eq!("subprotocol".parse(), Ok(TokenSource::Subprotocol));
    for bad in [
        "",
        "header:",
        "body:x",
        "header:bad name",
        "Subprotocol",
        "query",
    ] {
        assert!(bad.parse::<TokenSource>().is_err(), "{bad}");
    }
}

#[test]
fn each_source_finds_its_token() {
    let q = Some("room=1&access_token=abc%2Edef&x=2");
    let cases: Vec<(&str, HeaderMap, Option<&str>, &str, Stripped)> = vec![
        (
            "header:Authorization",
            headers(&[("authorization", "bearer  t1 ")]),
            None,
            "t1",
            Stripped::Header(header::AUTHORIZATION),
        ),
        (
            "header:Authorization",
            headers(&[("authorization", "BEARER t1")]),
            None,
            "t1",
            Stripped::Header(header::AUTHORIZATION),
        ),
        (
            "header:X-Token",
            headers(&[("x-token", " t2 ")]),
            None,
            "t2",
            Stripped::Header(HeaderName::from_static("x-token")),
        ),
        (
            "query:access_token",
            HeaderMap::new(),
            q,
            "abc.def",
            Stripped::Query("access_token".into()),
        ),
        (
            "cookie:token",
            headers(&[("cookie", "a=1; token=t4; b=2")]),
            None,
            "t4",
            Stripped::Cookie("token".into()),
        ),
        (
            "cookie:token",
            headers(&[("cookie", "a=1"), ("cookie", "token=\"t5\"")]),
            None,
            "t5",
            Stripped::Cookie("token".into()),
        ),
    ];
    for (src, h, q, token, stripped) in cases {
        let found = find_token(&sources(&[src]), &h, q).expect(src);
        assert_eq!(found.token, token, "{src}");
        assert_eq!(found.stripped, stripped, "{src}");
    }
}

#[test]
fn absent_or_foreign_credentials_are_not_tokens() {
    let s = sources(&["header:Authorization", "query:t", "cookie:t", "subprotocol"]);
    for h in [
        headers(&[("authorization", "Basic dXNlcjpwYXNz")]),
        headers(&[("authorization", "Bearer ")]),
        headers(&[("cookie", "other=1; tt=2")]),
        headers(&[("sec-websocket-protocol", "chat, bearer")]),
    ] {
        assert!(find_token(&s, &h, Some("tt=1&t=")).is_none(), "{h:?}");
    }
}

#[test]
fn subprotocol_trick_strips_both_entries() {
    let s = sources(&["subprotocol"]);
    let h = headers(&[("sec-websocket-protocol", "bearer, eyJ.a.b")]);
    let found = find_token(&s, &h, None).expect("found");
    assert_eq!(found.token, "eyJ.a.b");
    assert_eq!(
        found.stripped,
        Stripped::Subprotocol {
            remaining: vec![],
            answer_bearer: true
        }
    );
    let h = headers(&[
        ("sec-websocket-protocol", "chat.v2, bearer"),
        ("sec-websocket-protocol", "eyJ.a.b, mqtt"),
    ]);
    let found = find_token(&s, &h, None).expect("found");
    let expect = Stripped::Subprotocol {
        remaining: vec!["chat.v2".into(), "mqtt".into()],
        answer_bearer: false,
    };
    assert_eq!(found.stripped, expect);
    let mut upstream = h.clone();
    expect.apply_to_headers(&mut upstream);
    let offers: Vec<_> = upstream
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .collect();
    assert_eq!(offers, vec!["chat.v2, mqtt"]);
    let mut upstream = headers(&[("sec-websocket-protocol", "bearer, x")]);
    Stripped::Subprotocol {
        remaining: vec![],
        answer_bearer: true,
    }
    .apply_to_headers(&mut upstream);
    assert!(upstream.get(header::SEC_WEBSOCKET_PROTOCOL).is_none());
}

#[test]
fn first_source_with_a_token_wins() {
    let s = sources(&["header:Authorization", "query:access_token"]);
    let h = bearer("from-header");
    let found = find_token(&s, &h, Some("access_token=from-query")).expect("found");
    assert_eq!(found.token, "from-header");
    let found = find_token(&s, &HeaderMap::new(), Some("access_token=from-query")).expect("q");
    assert_eq!(found.token, "from-query");
}

#[test]
fn stripping_header_and_cookie() {
    let mut h = headers(&[
        ("authorization", "Bearer x"),
        ("cookie", "a=1; token=x"),
        ("cookie", "b=2"),
    ]);
    Stripped::Header(header::AUTHORIZATION).apply_to_headers(&mut h);
    Stripped::Cookie("token".into()).apply_to_headers(&mut h);
    assert!(h.get(header::AUTHORIZATION).is_none());
    let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
    assert_eq!(cookies, vec!["a=1; b=2"]);
    let mut h = headers(&[("cookie", "token=x")]);
    strip_cookie(&mut h, "token");
    assert!(h.get(header::COOKIE).is_none());
    let mut h = headers(&[("cookie", "a=1")]);
    Stripped::Query("t".into()).apply_to_headers(&mut h);
    assert_eq!(h.len(), 1);
}

// ----- JWT: HMAC ---------------------------------------------------------------------------

#[test]
fn hmac_tokens_of_each_size_verify() {
    for (alg, name) in [
        (Algorithm::HS256, "HS256"),
        (Algorithm::HS384, "HS384"),
        (Algorithm::HS512, "HS512"),
    ] {
        let mut keys = JwtKeys::new();
        keys.add_secret(name, b"a-long-enough-shared-secret-value")
            .expect("secret");
        let v = verifier(keys, strict_rules());
        let t = sign(
            alg,
            None,
            &claims(),
            &EncodingKey::from_secret(b"a-long-enough-shared-secret-value"),
        );
        let ok = v.check(&bearer(&t), None, NOW).expect(name);
        assert_eq!(ok.claims["sub"], "user-42");
        assert_eq!(ok.exp, Some(NOW + 600));
        assert_eq!(ok.stripped, Stripped::Header(header::AUTHORIZATION));
    }
}

#[test]
fn every_source_reaches_verification() {
    let secret = b"s3cret-s3cret-s3cret";
    let t = sign(
        Algorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(secret),
    );
    let all = sources(&[
        "header:Authorization",
        "header:X-Token",
        "query:access_token",
        "cookie:token",
        "subprotocol",
    ]);
    let v = JwtVerifier::new(all, hs_keys(secret), strict_rules()).expect("verifier");
    let query = format!("access_token={t}");
    let cases = [
        (bearer(&t), None),
        (headers(&[("x-token", &t)]), None),
        (HeaderMap::new(), Some(query.as_str())),
        (headers(&[("cookie", &format!("token={t}"))]), None),
        (
            headers(&[("sec-websocket-protocol", &format!("bearer, {t}"))]),
            None,
        ),
    ];
    for (h, q) in cases {
        assert!(v.check(&h, q, NOW).is_ok(), "{h:?} {q:?}");
    }
    assert_eq!(v.query_names(), vec!["access_token"]);
    assert_eq!(
        token_error(v.check(&HeaderMap::new(), None, NOW)),
        "missing"
    );
}

#[test]
fn time_and_claim_rules() {
    let secret = b"s3cret-s3cret-s3cret";
    let key = EncodingKey::from_secret(secret);
    let v = verifier(hs_keys(secret), strict_rules());
    let with = |patch: Value| {
        let mut c = claims();
        for (k, val) in patch.as_object().cloned().unwrap_or_default() {
            if val.is_null() {
                c.as_object_mut().map(|o| o.remove(&k));
            } else {
                c[k] = val;
            }
        }
        token_error_or_ok(v.check(&bearer(&sign(Algorithm::HS256, None, &c, &key)), None, NOW))
    };
    assert_eq!(with(json!({})), "ok");
    assert_eq!(with(json!({"exp": NOW - 31})), "expired");
    assert_eq!(with(json!({"exp": NOW - 29})), "ok", "within leeway");
    assert_eq!(
        with(json!({"exp": (NOW + 5) as f64 + 0.5})),
        "ok",
        "fractional exp"
    );
    assert_eq!(with(json!({"exp": "tomorrow"})), "malformed");
    assert_eq!(with(json!({"exp": null})), "missing_exp");
    assert_eq!(with(json!({"nbf": NOW + 31})), "not_yet_valid");
    assert_eq!(with(json!({"nbf": NOW + 29})), "ok", "within leeway");
    assert_eq!(
        with(json!({"iss": "https://evil.example.com/"})),
        "wrong_issuer"
    );
    assert_eq!(with(json!({"iss": null})), "wrong_issuer");
    assert_eq!(with(json!({"aud": "other"})), "wrong_audience");
    assert_eq!(with(json!({"aud": ["other", "chat"]})), "ok");
    assert_eq!(with(json!({"aud": null})), "wrong_audience");
    assert_eq!(with(json!({"scope": "read write"})), "claims_mismatch");
    assert_eq!(with(json!({"scope": "chat"})), "ok");
    assert_eq!(with(json!({"scope": null})), "claims_mismatch");

    let relaxed = JwtRules {
        require_exp: false,
        ..JwtRules::default()
    };
    let v = verifier(hs_keys(secret), relaxed);
    let t = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "x", "aud": "anything"}),
        &key,
    );
    let ok = v
        .check(&bearer(&t), None, NOW)
        .expect("no exp needed, aud unchecked");
    assert_eq!(ok.exp, None);
}

fn token_error_or_ok(r: Result<Authorized, Refusal>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(Refusal::Token { error }) => error,
        Err(other) => panic!("unexpected {other:?}"),
    }
}

#[test]
fn require_claims_matching() {
    let m = claim_matches;
    assert!(m(&json!("chat"), &json!("chat")));
    assert!(m(&json!("read chat admin"), &json!("chat")));
    assert!(!m(&json!("chatty"), &json!("chat")));
    assert!(m(&json!(["a", "chat"]), &json!("chat")));
    assert!(!m(&json!([["chat"]]), &json!("chat")));
    assert!(m(&json!(42), &json!(42)));
    assert!(m(&json!(42.0), &json!(42.0)));
    assert!(m(&json!(u64::MAX), &json!(u64::MAX)));
    // Expected values from the config are text: a number claim matches by value, a bool by its text.
    assert!(m(&json!(42), &json!("42")));
    assert!(m(&json!(42), &json!("42.0")));
    assert!(!m(&json!(42), &json!("43")));
    assert!(m(&json!(true), &json!("true")));
    assert!(!m(&json!(true), &json!("yes")));
    assert!(!m(&json!("42"), &json!(42)));
    assert!(m(&json!(true), &json!(true)));
    assert!(!m(&json!(false), &json!(true)));
    assert!(!m(&json!({"a": 1}), &json!("a")));
    let bad = JwtRules {
        require_claims: vec![("x".into(), json!(["a"]))],
        ..JwtRules::default()
    };
    let err = JwtVerifier::new(sources(&["subprotocol"]), hs_keys(b"k"), bad).expect_err("array");
    assert!(err.contains("require_claims.x"), "{err}");
    assert!(JwtVerifier::new(vec![], hs_keys(b"k"), JwtRules::default()).is_err());
    assert!(
        JwtVerifier::new(
            sources(&["subprotocol"]),
            JwtKeys::new(),
            JwtRules::default()
        )
        .is_err()
    );
}

#[test]
fn bad_signature_and_garbage_are_refused() {
    let v = verifier(hs_keys(b"right-secret"), JwtRules::default());
    let t = sign(
        Algorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(b"wrong-secret"),
    );
    assert_eq!(
        token_error(v.check(&bearer(&t), None, NOW)),
        "bad_signature"
    );
    let t = sign(
        Algorithm::HS512,
        None,
        &claims(),
        &EncodingKey::from_secret(b"right-secret"),
    );
    assert_eq!(
        token_error(v.check(&bearer(&t), None, NOW)),
        "unknown_key",
        "HS512 not configured"
    );
    for garbage in ["x", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30"] {
        assert_eq!(
            token_error(v.check(&bearer(garbage), None, NOW)),
            "malformed",
            "{garbage}"
        );
    }
    // A valid token with one payload byte changed.
    let good = sign(
        Algorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(b"right-secret"),
    );
    let parts: Vec<&str> = good.split('.').collect();
    let tampered_claims = b64url(
        json!({"sub": "admin", "exp": NOW + 600})
            .to_string()
            .as_bytes(),
    );
    let tampered = format!("{}.{}.{}", parts[0], tampered_claims, parts[2]);
    assert_eq!(
        token_error(v.check(&bearer(&tampered), None, NOW)),
        "bad_signature"
    );
}

#[test]
fn alg_none_is_refused() {
    let v = verifier(hs_keys(b"secret"), JwtRules::default());
    let body = b64url(
        json!({"sub": "admin", "exp": NOW + 600})
            .to_string()
            .as_bytes(),
    );
    for alg in ["none", "None", "NONE"] {
        let head = b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
        for sig in ["", "c2ln"] {
            let t = format!("{head}.{body}.{sig}");
            assert_eq!(
                token_error(v.check(&bearer(&t), None, NOW)),
                "bad_algorithm",
                "{alg}"
            );
        }
    }
}

// ----- JWT: public keys ---------------------------------------------------------------------

#[test]
fn ec_and_eddsa_keys_from_jwks() {
    let p256 = ec_key("P-256", "ec1");
    let p384 = ec_key("P-384", "ec2");
    let ed = ed_key("ed1");
    let mut keys = JwtKeys::new();
    let load = keys
        .add_jwks(&jwks(&[&p256.jwk, &p384.jwk, &ed.jwk]))
        .expect("jwks");
    assert_eq!(
        load,
        JwksLoad {
            loaded: 3,
            skipped: vec![]
        }
    );
    let v = verifier(keys, strict_rules());
    for (alg, key, kid) in [
        (Algorithm::ES256, &p256, "ec1"),
        (Algorithm::ES384, &p384, "ec2"),
        (Algorithm::EdDSA, &ed, "ed1"),
    ] {
        let t = sign(alg, Some(kid), &claims(), &key.encoding);
        assert!(v.check(&bearer(&t), None, NOW).is_ok(), "{alg:?} with kid");
        let t = sign(alg, None, &claims(), &key.encoding);
        assert!(
            v.check(&bearer(&t), None, NOW).is_ok(),
            "{alg:?} without kid"
        );
    }
    // A kid naming another key of the same algorithm does not verify.
    let other = ec_key("P-256", "ec3");
    let mut keys = JwtKeys::new();
    keys.add_jwks(&jwks(&[&p256.jwk, &other.jwk]))
        .expect("jwks");
    let v = verifier(keys, strict_rules());
    let t = sign(Algorithm::ES256, Some("ec3"), &claims(), &p256.encoding);
    assert_eq!(
        token_error(v.check(&bearer(&t), None, NOW)),
        "bad_signature"
    );
    // An unknown kid is only tried against kid-less keys: there are none here.
    let t = sign(Algorithm::ES256, Some("nope"), &claims(), &p256.encoding);
    assert_eq!(token_error(v.check(&bearer(&t), None, NOW)), "unknown_key");
}

fn remote_source() -> std::sync::Arc<RemoteKeys> {
    let tls = crate::tls::client_config(None, None).expect("tls");
    let uri = http::Uri::from_static("https://auth.example.com/jwks.json");
    std::sync::Arc::new(RemoteKeys::new(uri, Duration::from_secs(300), None, tls))
}

#[test]
fn jwks_url_keys_verify_once_fetched_and_an_unknown_kid_asks_for_one_refetch() {
    let ed = ed_key("ed1");
    let remote = remote_source();
    let v = JwtVerifier::with_remote(
        sources(&["header:Authorization"]),
        JwtKeys::new(),
        vec![remote.clone()],
        strict_rules(),
    )
    .expect("a jwks_url alone is a key");
    let token = sign(Algorithm::EdDSA, Some("ed1"), &claims(), &ed.encoding);
    // Before the first fetch there is nothing to verify against; the miss asks once.
    assert_eq!(
        token_error(v.check(&bearer(&token), None, NOW)),
        "unknown_key"
    );
    let t0 = std::time::Instant::now();
    assert!(
        !remote.kid_missed(t0),
        "the refused token already used this window's refetch"
    );

    let mut fetched = JwtKeys::new();
    fetched.add_jwks(&jwks(&[&ed.jwk])).expect("jwks");
    remote.store(fetched);
    assert!(v.check(&bearer(&token), None, NOW).is_ok());
    // A kid the fetched set has is known: a wrong signature is `bad_signature`, and asks
    // for nothing (checked through the window: it would still be closed either way, so
    // check that a known kid leaves a fresh source's window alone).
    let fresh = remote_source();
    fresh.store(JwtKeys::clone(&remote.keys()));
    let v = JwtVerifier::with_remote(
        sources(&["header:Authorization"]),
        JwtKeys::new(),
        vec![fresh.clone()],
        strict_rules(),
    )
    .expect("verifier");
    let other = ed_key("ed1");
    let forged = sign(Algorithm::EdDSA, Some("ed1"), &claims(), &other.encoding);
    assert_eq!(
        token_error(v.check(&bearer(&forged), None, NOW)),
        "bad_signature"
    );
    assert!(fresh.kid_missed(t0), "a known kid asked for no refetch");
}

#[test]
fn a_verifier_needs_a_key_or_a_jwks_url() {
    let err = JwtVerifier::with_remote(
        sources(&["header:Authorization"]),
        JwtKeys::new(),
        Vec::new(),
        strict_rules(),
    )
    .err();
    assert!(err.is_some_and(|e| e.contains("jwks_url")));
}

#[test]
fn rsa_keys_from_jwks_rs256_and_ps256() {
    let Some((enc, jwk, _)) = rsa_key("rsa1", Algorithm::RS256) else {
        return;
    };
    let mut ps = jwk.clone();
    ps["kid"] = json!("rsa1-pss");
    ps["alg"] = json!("PS256");
    let mut no_alg = jwk.clone();
    no_alg["kid"] = json!("rsa1-noalg");
    no_alg.as_object_mut().map(|o| o.remove("alg"));
    let mut keys = JwtKeys::new();
    keys.add_jwks(&jwks(&[&jwk, &ps, &no_alg])).expect("jwks");
    let v = verifier(keys, strict_rules());
    for (alg, kid) in [
        (Algorithm::RS256, Some("rsa1")),
        (Algorithm::PS256, Some("rsa1-pss")),
        (Algorithm::RS256, Some("rsa1-noalg")),
        (Algorithm::RS256, None),
        (Algorithm::PS256, None),
    ] {
        let t = sign(alg, kid, &claims(), &enc);
        assert!(v.check(&bearer(&t), None, NOW).is_ok(), "{alg:?} {kid:?}");
    }
    // The key bound to RS256 does not verify a PS256 token naming it.
    let t = sign(Algorithm::PS256, Some("rsa1"), &claims(), &enc);
    assert_eq!(token_error(v.check(&bearer(&t), None, NOW)), "unknown_key");
}

#[test]
fn algorithm_confusion_rsa_public_key_as_hmac_secret_is_refused() {
    let Some((_, jwk, n)) = rsa_key("rsa1", Algorithm::RS256) else {
        return;
    };
    let mut keys = JwtKeys::new();
    keys.add_jwks(&jwks(&[&jwk])).expect("jwks");
    let v = verifier(keys, JwtRules::default());
    // Attackers HMAC-sign with whatever public material they can get: the JWK text, its
    // modulus, a PEM of it. None may verify.
    let jwk_text = jwk.to_string();
    for secret in [jwk_text.as_bytes(), n.as_slice()] {
        for kid in [Some("rsa1"), None] {
            let t = sign(
                Algorithm::HS256,
                kid,
                &claims(),
                &EncodingKey::from_secret(secret),
            );
            assert_eq!(
                token_error(v.check(&bearer(&t), None, NOW)),
                "unknown_key",
                "{kid:?}"
            );
        }
    }
    // A JWKS that declares an HMAC algorithm on an RSA key is refused outright.
    let mut confused = jwk.clone();
    confused["alg"] = json!("HS256");
    let err = JwtKeys::new()
        .add_jwks(&jwks(&[&confused]))
        .expect_err("confused");
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn jwks_validation() {
    let ec = ec_key("P-256", "ec1");
    let mut enc_key = ec.jwk.clone();
    enc_key["use"] = json!("enc");
    enc_key["kid"] = json!("enc1");
    let p521 = json!({"kty": "EC", "crv": "P-521", "kid": "big", "x": "AA", "y": "AA"});
    let mut keys = JwtKeys::new();
    let load = keys
        .add_jwks(&jwks(&[&ec.jwk, &enc_key, &p521]))
        .expect("jwks");
    assert_eq!(
        load,
        JwksLoad {
            loaded: 1,
            skipped: vec!["enc1".into(), "big".into()]
        }
    );

    let oct = json!({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "sym"});
    let err = JwtKeys::new().add_jwks(&jwks(&[&oct])).expect_err("oct");
    assert!(err.contains("key sym") && err.contains("secret"), "{err}");
    let err = JwtKeys::new()
        .add_jwks(&jwks(&[&enc_key]))
        .expect_err("nothing usable");
    assert!(err.contains("no usable"), "{err}");
    let err = JwtKeys::new().add_jwks("{\"keys\": 1}").expect_err("shape");
    assert!(err.contains("JWKS"), "{err}");
    // Fetched from a URL, the same `oct` entry is left out and the usable keys stay.
    let mut fetched = JwtKeys::new();
    let load = fetched
        .add_fetched_jwks(&jwks(&[&oct, &ec.jwk]))
        .expect("the usable key loads");
    assert_eq!(load.loaded, 1);
    assert!(
        load.skipped.iter().any(|s| s.starts_with("sym")),
        "{load:?}"
    );
    let err = JwtKeys::new()
        .add_fetched_jwks(&jwks(&[&oct]))
        .expect_err("nothing usable");
    assert!(err.contains("no usable"), "{err}");
    let mut wrong_curve_alg = ec.jwk.clone();
    wrong_curve_alg["alg"] = json!("ES384");
    assert!(JwtKeys::new().add_jwks(&jwks(&[&wrong_curve_alg])).is_err());
}

#[test]
fn secrets_validation_and_debug_hides_them() {
    let mut k = JwtKeys::new();
    assert!(
        k.add_secret("RS256", b"x")
            .expect_err("rs")
            .contains("jwks_file")
    );
    assert!(
        k.add_secret("HS256", b"")
            .expect_err("empty")
            .contains("empty")
    );
    k.add_secret("HS384", b"super-secret-value").expect("ok");
    let dbg = format!("{k:?}");
    assert!(
        !dbg.contains("super-secret-value") && dbg.contains("HS384"),
        "{dbg}"
    );
}

// ----- API keys and forwarded claims -------------------------------------------------------

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn api_keys() {
    let file = format!(
        "# team keys\n\n{}\n  {}  \n",
        sha256_hex("key-one"),
        sha256_hex("key-two").to_uppercase()
    );
    let keys = ApiKeys::parse(&file).expect("parse");
    assert_eq!(keys.len(), 2);
    assert!(keys.matches(b"key-one") && keys.matches(b"key-two"));
    assert!(!keys.matches(b"key-three") && !keys.matches(b""));
    // A key's identity is its line in the file, comments and blank lines counted.
    assert_eq!(keys.line_of(b"key-one"), Some(3));
    assert_eq!(keys.line_of(b"key-two"), Some(4));
    assert_eq!(keys.line_of(b"key-three"), None);
    assert_eq!(format!("{keys:?}"), "ApiKeys(2 hashes)");

    let err = ApiKeys::parse("# c\nkey-one\n").expect_err("raw key");
    assert!(
        err.starts_with("line 2:") && err.contains("sha256sum"),
        "{err}"
    );
    assert!(
        !err.contains("key-one"),
        "the error never echoes the line: {err}"
    );

    let v = ApiKeyVerifier::new("header:X-Api-Key".parse().expect("src"), keys.clone());
    assert_eq!(
        v.check(&headers(&[("x-api-key", " key-one ")]), None),
        Ok(Stripped::Header(HeaderName::from_static("x-api-key")))
    );
    assert_eq!(
        v.check(&headers(&[("x-api-key", "nope")]), None),
        Err(Refusal::Token {
            error: "bad_api_key"
        })
    );
    assert_eq!(
        v.check(&HeaderMap::new(), None),
        Err(Refusal::Token { error: "missing" })
    );
    assert_eq!(v.query_name(), None);

    let v = ApiKeyVerifier::new("query:api_key".parse().expect("src"), keys);
    assert_eq!(
        v.check(&HeaderMap::new(), Some("api_key=key%2Dtwo")),
        Ok(Stripped::Query("api_key".into()))
    );
    assert_eq!(
        v.check(&HeaderMap::new(), Some("api_key=")),
        Err(Refusal::Token { error: "missing" })
    );
    assert_eq!(v.query_name(), Some("api_key"));
    assert!("cookie:x".parse::<ApiKeySource>().is_err());
}

#[test]
fn forwarded_claim_values() {
    let c = json!({"sub": "user-42", "n": 7, "admin": false, "roles": ["a", "b"], "bad": "a\nb", "nul": null});
    let v = |n| claim_header_value(&c, n).map(|h| h.to_str().unwrap_or("?").to_string());
    assert_eq!(v("sub").as_deref(), Some("user-42"));
    assert_eq!(v("n").as_deref(), Some("7"));
    assert_eq!(v("admin").as_deref(), Some("false"));
    assert_eq!(v("roles").as_deref(), Some("[\"a\",\"b\"]"));
    assert_eq!(v("bad"), None);
    assert_eq!(v("nul"), None);
    assert_eq!(v("absent"), None);
}

#[test]
fn unix_now_is_plausible() {
    assert!(unix_now() > 1_700_000_000);
}

// ----- properties --------------------------------------------------------------------------

proptest! {
    #[test]
    fn parsers_never_panic(s in "\\PC{0,80}") {
        let _ = s.parse::<TokenSource>();
        let _ = s.parse::<ApiKeySource>();
        let _ = ApiKeys::parse(&s);
        let _ = JwtKeys::new().add_jwks(&s);
        let v = verifier(hs_keys(b"k"), JwtRules::default());
        let _ = v.verify(&s, NOW);
        if let Ok(hv) = HeaderValue::from_str(&s) {
            let mut h = HeaderMap::new();
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, hv.clone());
            h.insert(header::COOKIE, hv.clone());
            h.insert(header::AUTHORIZATION, hv);
            let all = sources(&["header:Authorization", "cookie:t", "subprotocol"]);
            let _ = find_token(&all, &h, Some(&s));
        }
    }

    #[test]
    fn subprotocol_offers_other_than_the_pair_are_kept_in_order(
        before in proptest::collection::vec("[a-z][a-z0-9.]{0,8}", 0..3),
        after in proptest::collection::vec("[a-z][a-z0-9.]{0,8}", 0..3),
    ) {
        prop_assume!(!before.iter().chain(&after).any(|o| o == BEARER_PROTOCOL));
        let mut offers = before.clone();
        offers.push("bearer".into());
        offers.push("tok.en.value".into());
        offers.extend(after.iter().cloned());
        let h = headers(&[("sec-websocket-protocol", &offers.join(", "))]);
        let (token, remaining) = bearer_subprotocol(&h).expect("found");
        prop_assert_eq!(token, "tok.en.value");
        let expected: Vec<String> = before.into_iter().chain(after).collect();
        prop_assert_eq!(remaining, expected);
    }

    #[test]
    fn hex_keys_roundtrip(key in proptest::collection::vec(any::<u8>(), 0..64)) {
        let hex: String = Sha256::digest(&key).iter().map(|b| format!("{b:02x}")).collect();
        let keys = ApiKeys::parse(&hex).expect("hash line");
        prop_assert!(keys.matches(&key));
        let mut other = key.clone();
        other.push(0);
        prop_assert!(!keys.matches(&other));
    }
}
