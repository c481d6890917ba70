//! Admission as a pure decision (SPEC §3): a request head, the client's address, the
//! config and the limiters go in; an [`Admission`] (what the upstream request carries, the
//! per-IP permit, the sticky key) or a [`Refusal`] comes out. No socket in sight, so every
//! outcome and the order of the checks are unit-tested here, and every HTTP driver (the
//! HTTP/1.1 one today) calls this one function.
//!
//! The order: draining, process cap, handshake rate, the upgrade itself (route, RFC 6455,
//! subprotocols), origin, token and API key, revocation (of the token's subject or id),
//! per-IP cap, per-subject cap, the forwarded request.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::request;
use tokio::time::Instant;

use super::facts::Facts;
use super::forward::Pass;
use super::upgrade::{self, Upgrade};
use crate::admission::client_ip::{self, IpKey};
use crate::admission::ip_limit::{HandshakeRate, IpLimiter, IpPermit};
use crate::admission::subject::{SubjectKey, SubjectLimiter, SubjectPermit};
use crate::admission::token;
use crate::config::{Config, RouteAdmission, StickyKey};
use crate::ops::revocation::RevocationStore;
use crate::outcome::Refusal;
use crate::upstream::sticky;

/// The process state a decision reads.
pub struct Limiters<'a> {
    /// Past the drain window: new handshakes get 503 `draining`.
    pub draining: bool,
    /// `limits.max_connections` was exceeded when this connection was accepted.
    pub over_capacity: bool,
    pub per_ip: &'a Arc<IpLimiter>,
    pub per_subject: &'a Arc<SubjectLimiter>,
    pub handshake_rate: &'a HandshakeRate,
    /// Revoked subjects and token ids (SPEC §7 `/revoke`): read, never waited on.
    pub revocations: &'a dyn RevocationStore,
}

/// The per-IP count taken at accept, when the peer was the client.
pub enum EarlyPermit {
    /// Not taken: the peer is a trusted proxy (the client is known from the head only).
    NotTaken,
    /// Judged at accept ([`admit_at_accept`]): the handshake rate counted, and the
    /// connection counted since then against the widest cap any route allows.
    Held(IpPermit),
    /// Treated as over the cap: what the driver uses when the accept-time count cannot be
    /// read (a poisoned lock), so nothing is counted afresh.
    OverCap,
    /// Held by a kept-alive connection since an earlier plain HTTP request of it: each
    /// later request counts against the handshake rate again; the cap is already held.
    Kept(IpPermit),
}

/// An admitted upgrade: what the upstream connection needs.
pub struct Admission<'r> {
    pub upgrade: Upgrade<'r>,
    /// The request as the upstream must see it (claims set, credentials stripped).
    pub upstream_parts: request::Parts,
    /// Counts the connection against its client's per-IP cap while it lives.
    pub permit: IpPermit,
    /// Counts it against its subject's cap (`max_connections_per_subject` on, and a
    /// subject known).
    pub subject_permit: Option<SubjectPermit>,
    /// Whom the connection belongs to (JWT `iss`+`sub`, or the API key), capped or not:
    /// the fleet's subject cap (SPEC §10) counts it too.
    pub subject: Option<SubjectKey>,
    /// The token's id (JWT `jti`), for `/revoke?jti=`.
    pub jti: Option<Box<str>>,
    pub client_ip: IpAddr,
    pub sticky_key: Vec<u8>,
    /// `close_on_expiry`: when the live connection must end.
    pub expires_at: Option<Instant>,
    /// The client offered only `bearer, <token>`: the 101 answers `bearer`.
    pub answer_bearer: bool,
}

/// What is judged at accept, from the client's address alone (SPEC §3 "Admission before
/// work"): the process cap, the handshake rate and the per-IP cap, in that order, before
/// TLS and before the head. The per-IP cap is the widest any route allows (the route is
/// not known yet); [`admit`] checks the route's own. Only when the peer is the client: a
/// trusted proxy's clients are known from the head.
pub fn admit_at_accept(
    client: IpAddr,
    over_capacity: bool,
    config: &Config,
    per_ip: &Arc<IpLimiter>,
    handshake_rate: &HandshakeRate,
) -> Result<IpPermit, Refusal> {
    if over_capacity {
        return Err(Refusal::Capacity);
    }
    let key = IpKey::new(client, config.limits.ipv6_prefix);
    handshake_rate.admit(key)?;
    per_ip.admit(key, widest_ip_cap(config))
}

/// The highest `max_connections_per_ip` of the top level and every route.
pub fn widest_ip_cap(config: &Config) -> u32 {
    config
        .routes
        .iter()
        .map(|r| r.limits.max_connections_per_ip)
        .fold(config.limits.max_connections_per_ip, u32::max)
}

/// Decides one upgrade request from `peer` (the TCP peer, after any PROXY header).
/// `facts` gathers what the access log says about it, refused or not. `early` is taken
/// over at the per-IP step (and released if refused there or earlier by its owner).
pub fn admit<'r>(
    facts: &mut Facts,
    parts: &request::Parts,
    peer: IpAddr,
    config: &'r Config,
    limiters: &Limiters<'_>,
    early: &mut EarlyPermit,
) -> Result<Admission<'r>, Refusal> {
    let client_ip = client_ip::client_ip(peer, &parts.headers, &config.trusted_proxies);
    facts.client_ip = Some(client_ip);
    // Named before any refusal, so refusals are logged and counted per route.
    if let Some(route) = upgrade::route_of(parts, &config.routes) {
        facts.route_known(route, &parts.uri, &config.secret_query_names);
    }
    if limiters.draining {
        return Err(Refusal::Draining);
    }
    if limiters.over_capacity {
        return Err(Refusal::Capacity);
    }
    let key = IpKey::new(client_ip, config.limits.ipv6_prefix);
    // Judged at accept already when the peer was the client (for the connection's first
    // request only: every later one counts again).
    if matches!(early, EarlyPermit::NotTaken | EarlyPermit::Kept(_)) {
        limiters.handshake_rate.admit(key)?;
    }
    let mut upgrade = upgrade::check(parts, &config.routes)?;
    let route = upgrade.route;
    if facts.route.as_deref() != Some(route.name.as_str()) {
        facts.route_known(route, &parts.uri, &config.secret_query_names);
    }
    let policy = &route.admission;
    // A plain request meets the Origin check when it has an Origin (SPEC §3 "HTTP
    // alongside WebSockets"): browsers send none on same-origin GETs.
    if !upgrade.plain || parts.headers.contains_key(http::header::ORIGIN) {
        policy.origins.check_headers(&parts.headers)?;
    }
    let sticky_claim = match &route.upstream.sticky {
        StickyKey::Claim(name) => Some(name.as_str()),
        _ => None,
    };
    let (pass, who) = authorize(policy, parts, sticky_claim)?;
    facts.subject = pass.subject.clone();
    if (pass.subject.is_some() || who.jti.is_some())
        && limiters
            .revocations
            .is_revoked(pass.subject.as_deref(), who.jti.as_deref())
    {
        return Err(Refusal::Revoked);
    }
    let cap = route.limits.max_connections_per_ip;
    let permit = match std::mem::replace(early, EarlyPermit::NotTaken) {
        // Counted since accept: only the route's own (possibly lower) cap is left to check.
        EarlyPermit::Held(p) | EarlyPermit::Kept(p)
            if p.key() == key && limiters.per_ip.count(key) <= cap =>
        {
            p
        }
        EarlyPermit::Held(_) | EarlyPermit::OverCap => return Err(Refusal::IpCap),
        // A trusted proxy's connection carrying another client's request now.
        EarlyPermit::Kept(p) if p.key() != key => {
            drop(p);
            limiters.per_ip.admit(key, cap)?
        }
        EarlyPermit::Kept(_) => return Err(Refusal::IpCap),
        EarlyPermit::NotTaken => limiters.per_ip.admit(key, cap)?,
    };
    let subject_cap = route.limits.max_connections_per_subject;
    let subject_key = match (&pass.subject, who.api_key) {
        (Some(sub), _) => Some(SubjectKey::jwt(who.iss.as_deref(), sub)),
        (None, Some(digest)) => Some(SubjectKey::ApiKey(digest)),
        (None, None) => None,
    };
    let subject_permit = match &subject_key {
        Some(k) if subject_cap > 0 => Some(limiters.per_subject.admit(k.clone(), subject_cap)?),
        _ => None,
    };
    let upstream_parts = pass.upstream_parts(parts, &mut upgrade, &config.strip_headers)?;
    let key = sticky::key(
        &route.upstream.sticky,
        parts,
        pass.sticky_claim.as_deref(),
        client_ip,
    );
    facts.sticky = Some(key.log);
    Ok(Admission {
        upgrade,
        upstream_parts,
        permit,
        subject_permit,
        subject: subject_key,
        jti: who.jti.map(String::into_boxed_str),
        client_ip,
        sticky_key: key.bytes,
        expires_at: pass.expires_at,
        answer_bearer: pass.answer_bearer,
    })
}

/// Who a verified credential names, beyond the subject the log shows.
#[derive(Default)]
struct Who {
    /// The JWT's `jti`.
    jti: Option<String>,
    /// The JWT's `iss`: with `sub`, the subject the per-subject cap counts.
    iss: Option<String>,
    /// The API key's SHA-256 (its identity across keys files).
    api_key: Option<[u8; 32]>,
}

/// Checks the route's JWT and API key (SPEC §2 `auth`).
fn authorize(
    policy: &RouteAdmission,
    parts: &request::Parts,
    sticky_claim: Option<&str>,
) -> Result<(Pass, Who), Refusal> {
    let mut pass = Pass::default();
    let mut who = Who::default();
    let query = parts.uri.query();
    if let Some(jwt) = &policy.jwt {
        let authorized = jwt
            .verifier
            .check(&parts.headers, query, token::unix_now())?;
        pass.subject = name_claim(authorized.claims.get("sub"));
        who.jti = name_claim(authorized.claims.get("jti"));
        who.iss = authorized
            .claims
            .get("iss")
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        pass.sticky_claim = sticky_claim.and_then(|c| sticky::claim_text(&authorized.claims, c));
        for (claim, header) in &jwt.forward_claims {
            if let Some(value) = token::claim_header_value(&authorized.claims, claim) {
                pass.claims.push((header.clone(), value));
            }
        }
        if jwt.close_on_expiry
            && let Some(exp) = authorized.exp
        {
            // A signed `exp` centuries away must not overflow the clock: no expiry then.
            let left = Duration::from_secs(exp.saturating_sub(token::unix_now()));
            pass.expires_at = Instant::now()
                .checked_add(left)
                .and_then(|at| at.checked_add(jwt.verifier.leeway()));
        }
        if let token::Stripped::Subprotocol {
            remaining,
            answer_bearer,
        } = &authorized.stripped
        {
            pass.subprotocols = Some(remaining.clone());
            pass.answer_bearer = *answer_bearer;
        } else if jwt.subprotocol {
            // The token came from elsewhere: the offers still lose any bearer entries and
            // still meet the allowlist.
            pass.subprotocols = Some(token::offers_without_bearer(&parts.headers));
        }
        if jwt.strip_token {
            pass.strip = jwt.verifier.stripped_sources();
        }
    }
    if let Some(keys) = &policy.api_keys {
        // The key is never forwarded upstream (SPEC §2), whatever `strip_token` says.
        let (stripped, digest) = keys.identify(&parts.headers, query)?;
        pass.strip.push(stripped);
        who.api_key = Some(digest);
    }
    Ok((pass, who))
}

/// A claim that names someone or something (`sub`, `jti`): a string as it is, a number as
/// its decimal text (`{"sub": 42}` is subject `42`, capped and revocable like `"42"`);
/// anything else names nobody.
fn name_claim(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn config(burst: u32) -> Config {
        let yaml = format!(
            r#"
listeners: [{{ name: plain, bind: "127.0.0.1:0" }}]
limits: {{ max_connections_per_ip: 2, handshakes_per_ip: {{ rate: 1, per: 1h, burst: {burst} }} }}
upstreams:
  echo: {{ backends: [{{ addr: "127.0.0.1:9" }}] }}
routes:
  - name: private
    match: {{ path_prefix: /private }}
    upstream: echo
    origins: ["https://app.example.com"]
    subprotocols: [chat]
    auth:
      jwt:
        from: ["header:Authorization"]
        keys: [{{ alg: HS256, secret: "{SECRET}" }}]
        forward_claims: {{ sub: X-User-Id }}
    limits: {{ max_connections_per_ip: 1 }}
  - {{ name: public, match: {{ path_prefix: / }}, upstream: echo }}
"#
        );
        match Config::from_yaml_str(&yaml, "test.yaml") {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn token(sub: &str) -> String {
        let claims = serde_json::json!({ "sub": sub, "exp": token::unix_now() + 600 });
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        match jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn upgrade(path: &str) -> http::request::Builder {
        http::Request::get(path)
            .header("host", "gw.example.com")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    fn private(b: http::request::Builder) -> request::Parts {
        let b = b
            .header("origin", "https://app.example.com")
            .header("authorization", format!("Bearer {}", token("alice")));
        parts(b)
    }

    fn parts(b: http::request::Builder) -> request::Parts {
        match b.body(()) {
            Ok(r) => r.into_parts().0,
            Err(e) => panic!("{e}"),
        }
    }

    /// One process's limiters, as a gateway holds them.
    struct World {
        config: Config,
        per_ip: Arc<IpLimiter>,
        per_subject: Arc<SubjectLimiter>,
        rate: HandshakeRate,
        revocations: crate::ops::revocation::InMemory,
    }

    impl World {
        fn new(config: Config) -> World {
            let rate = match HandshakeRate::new(config.limits.handshakes_per_ip) {
                Ok(r) => r,
                Err(e) => panic!("{e}"),
            };
            World {
                config,
                per_ip: IpLimiter::new(),
                per_subject: SubjectLimiter::new(),
                rate,
                revocations: crate::ops::revocation::InMemory::new(
                    crate::ops::registry::Registry::new(),
                ),
            }
        }

        fn limiters(&self, draining: bool, over_capacity: bool) -> Limiters<'_> {
            Limiters {
                draining,
                over_capacity,
                per_ip: &self.per_ip,
                per_subject: &self.per_subject,
                handshake_rate: &self.rate,
                revocations: &self.revocations,
            }
        }

        fn decide(&self, parts: &request::Parts) -> (Facts, Result<Admission<'_>, Refusal>) {
            self.decide_with(parts, &self.limiters(false, false), EarlyPermit::NotTaken)
        }

        fn decide_with(
            &self,
            parts: &request::Parts,
            limiters: &Limiters<'_>,
            mut early: EarlyPermit,
        ) -> (Facts, Result<Admission<'_>, Refusal>) {
            let mut facts = Facts::from_parts(parts);
            let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
            let decided = admit(&mut facts, parts, peer, &self.config, limiters, &mut early);
            (facts, decided)
        }
    }

    fn refusal(r: &Result<Admission<'_>, Refusal>) -> Option<&'static str> {
        r.as_ref().err().map(|r| r.reason())
    }

    #[test]
    fn admits_with_the_forwarded_request_the_permit_and_the_facts() {
        let world = World::new(config(100));
        let req =
            private(upgrade("/private/room?x=1").header("sec-websocket-protocol", "chat, other"));
        let (facts, decided) = world.decide(&req);
        let Ok(a) = decided else {
            panic!("refused: {:?}", decided.err());
        };
        assert_eq!(a.upgrade.route.name, "private");
        assert_eq!(a.upgrade.protocols.as_deref(), Some("chat"));
        assert_eq!(a.upstream_parts.headers["x-user-id"], "alice");
        assert_eq!(a.client_ip, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(a.permit.key(), IpKey::new(a.client_ip, 64));
        assert_eq!(facts.route.as_deref(), Some("private"));
        assert_eq!(facts.subject.as_deref(), Some("alice"));
        assert_eq!(facts.path.as_deref(), Some("/private/room?x=1"));
        assert!(facts.sticky.is_some());
        assert_eq!(world.per_ip.count(a.permit.key()), 1);
    }

    /// `http: proxy`: a plain request is admitted (no Origin is fine, a wrong one is not),
    /// and each later request of a kept-alive connection counts against the rate again,
    /// keeping the connection's one per-IP place.
    #[test]
    fn plain_requests_on_a_proxy_route_are_admitted_and_counted() {
        let yaml = r#"
listeners: [{ name: plain, bind: "127.0.0.1:0" }]
limits: { handshakes_per_ip: { rate: 1, per: 1h, burst: 4 } }
upstreams:
  echo: { backends: [{ addr: "127.0.0.1:9" }] }
routes:
  - { name: io, match: { path_prefix: /io }, upstream: echo, http: proxy, origins: ["https://app.example.com"] }
  - { name: ws, match: { path_prefix: / }, upstream: echo }
"#;
        let world = match Config::from_yaml_str(yaml, "test.yaml") {
            Ok(c) => World::new(c),
            Err(e) => panic!("{e}"),
        };
        let evil = parts(
            http::Request::get("/io/")
                .header("host", "gw")
                .header("origin", "https://evil.example"),
        );
        assert_eq!(refusal(&world.decide(&evil).1), Some("origin"));
        let plain_ws = parts(http::Request::get("/elsewhere").header("host", "gw"));
        assert_eq!(
            refusal(&world.decide(&plain_ws).1),
            Some("upgrade_required")
        );
        let poll = || parts(http::Request::post("/io/?sid=1").header("host", "gw"));
        let limiters = world.limiters(false, false);
        let (_, first) = world.decide_with(&poll(), &limiters, EarlyPermit::NotTaken);
        let Ok(a) = first else {
            panic!("refused: {:?}", first.err());
        };
        assert!(a.upgrade.plain);
        assert_eq!(a.upgrade.upstream_target, "/io/?sid=1");
        let key = a.permit.key();
        let (_, second) = world.decide_with(&poll(), &limiters, EarlyPermit::Kept(a.permit));
        let Ok(b) = second else {
            panic!("refused: {:?}", second.err());
        };
        assert_eq!(world.per_ip.count(key), 1);
        let (_, third) = world.decide_with(&poll(), &limiters, EarlyPermit::Kept(b.permit));
        assert_eq!(refusal(&third), Some("ip_rate"));
    }

    /// Every refusal, each from a request that would pass every later check: the one that
    /// refuses is the first that fails, in SPEC §3's order.
    #[test]
    fn each_check_refuses_in_spec_order() {
        let world = World::new(config(100));
        let good = || private(upgrade("/private"));
        let cases: Vec<(&str, request::Parts, bool, bool)> = vec![
            ("draining", good(), true, true),
            ("capacity", good(), false, true),
            (
                "bad_upgrade",
                private(upgrade("/private").method("POST")),
                false,
                false,
            ),
            (
                "upgrade_required",
                parts(
                    http::Request::get("/private")
                        .header("host", "gw")
                        .header("origin", "https://evil.example"),
                ),
                false,
                false,
            ),
            (
                "bad_version",
                private(upgrade("/private").header("sec-websocket-version", "8")),
                false,
                false,
            ),
            (
                "subprotocol",
                private(upgrade("/private").header("sec-websocket-protocol", "other")),
                false,
                false,
            ),
            (
                "origin",
                parts(
                    upgrade("/private")
                        .header("origin", "https://evil.example")
                        .header("authorization", "Bearer x"),
                ),
                false,
                false,
            ),
            (
                "token",
                parts(upgrade("/private").header("origin", "https://app.example.com")),
                false,
                false,
            ),
        ];
        for (want, req, draining, over_capacity) in cases {
            // A fresh world each: the handshake rate must not decide these.
            let world = World::new(config(100));
            let limiters = world.limiters(draining, over_capacity);
            let (facts, decided) = world.decide_with(&req, &limiters, EarlyPermit::NotTaken);
            assert_eq!(refusal(&decided), Some(want), "{want}");
            // Refused before the per-IP step: nothing counted.
            let ip = IpKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 64);
            assert_eq!(world.per_ip.count(ip), 0, "{want}");
            assert!(facts.client_ip.is_some(), "{want}");
        }
        drop(world);
    }

    #[test]
    fn the_handshake_rate_comes_before_the_upgrade_checks() {
        let world = World::new(config(3));
        // The burst is 3: three requests (even broken ones) use it up.
        for _ in 0..3 {
            let (_, decided) = world.decide(&parts(http::Request::get("/").header("host", "gw")));
            assert_eq!(refusal(&decided), Some("upgrade_required"));
        }
        let (_, decided) = world.decide(&private(upgrade("/private")));
        assert_eq!(refusal(&decided), Some("ip_rate"));
        // Draining still comes first.
        let (_, decided) = world.decide_with(
            &private(upgrade("/private")),
            &world.limiters(true, false),
            EarlyPermit::NotTaken,
        );
        assert_eq!(refusal(&decided), Some("draining"));
    }

    #[test]
    fn the_routes_own_per_ip_cap_applies_after_the_token() {
        let world = World::new(config(100));
        let (_, first) = world.decide(&private(upgrade("/private")));
        assert!(first.is_ok());
        // The private route allows one per address; the public one two.
        let (_, second) = world.decide(&private(upgrade("/private")));
        assert_eq!(refusal(&second), Some("ip_cap"));
        let (_, public) = world.decide(&parts(upgrade("/public")));
        assert!(public.is_ok());
        // A bad token is still a 401 when over the cap: the cap comes after the token.
        let (_, bad) = world.decide(&parts(
            upgrade("/private").header("origin", "https://app.example.com"),
        ));
        assert_eq!(refusal(&bad), Some("token"));
    }

    #[test]
    fn a_permit_taken_at_accept_is_kept_or_refused_by_the_route_cap() {
        let world = World::new(config(100));
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let key = IpKey::new(ip, 64);
        let held = |w: &World| match w.per_ip.try_acquire(key, 2) {
            Some(p) => EarlyPermit::Held(p),
            None => panic!("cap"),
        };
        let limiters = world.limiters(false, false);
        let (_, kept) = world.decide_with(&private(upgrade("/private")), &limiters, held(&world));
        assert!(kept.is_ok());
        assert_eq!(
            world.per_ip.count(key),
            1,
            "the accept-time count is reused"
        );
        // A second connection counted at accept is over the private route's cap of one.
        let (_, over) = world.decide_with(&private(upgrade("/private")), &limiters, held(&world));
        assert_eq!(refusal(&over), Some("ip_cap"));
        assert_eq!(world.per_ip.count(key), 1, "a refused permit is released");
        let (_, capped) =
            world.decide_with(&parts(upgrade("/public")), &limiters, EarlyPermit::OverCap);
        assert_eq!(refusal(&capped), Some("ip_cap"));
        drop(kept);
    }

    #[test]
    fn at_accept_capacity_comes_before_the_rate_and_the_rate_before_the_cap() {
        let world = World::new(config(2));
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
        let judge = |over: bool| {
            admit_at_accept(ip, over, &world.config, &world.per_ip, &world.rate).map(|p| p.key())
        };
        assert_eq!(judge(true), Err(Refusal::Capacity), "no rate token spent");
        let a = admit_at_accept(ip, false, &world.config, &world.per_ip, &world.rate);
        let b = admit_at_accept(ip, false, &world.config, &world.per_ip, &world.rate);
        assert!(a.is_ok() && b.is_ok());
        assert!(matches!(judge(false), Err(Refusal::IpRate { .. })));
        drop((a, b));
        assert_eq!(world.per_ip.count(IpKey::new(ip, 64)), 0);
        // Judged at accept, the head's decision does not count the rate again.
        let world = World::new(config(1));
        let permit = admit_at_accept(ip, false, &world.config, &world.per_ip, &world.rate);
        let early = match permit {
            Ok(p) => EarlyPermit::Held(p),
            Err(e) => panic!("{e}"),
        };
        let mut facts = Facts::default();
        let parts = parts(upgrade("/public"));
        let limiters = world.limiters(false, false);
        let mut early = early;
        let decided = admit(&mut facts, &parts, ip, &world.config, &limiters, &mut early);
        assert!(decided.is_ok(), "{:?}", decided.err());
    }

    #[test]
    fn the_widest_cap_is_the_highest_of_the_top_level_and_every_route() {
        assert_eq!(widest_ip_cap(&config(1)), 2);
    }

    #[tokio::test]
    async fn a_revoked_subject_or_token_id_is_refused_after_the_token_check() {
        use crate::ops::revocation::{RevocationStore, Target};
        let world = World::new(config(100));
        let hour = Duration::from_secs(3600);
        let _ = world
            .revocations
            .revoke(Target::Subject("alice".into()), hour)
            .await;
        let (facts, decided) = world.decide(&private(upgrade("/private")));
        assert_eq!(refusal(&decided), Some("revoked"));
        assert_eq!(facts.subject.as_deref(), Some("alice"));
        // Nothing counted for a revoked subject.
        let ip = IpKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 64);
        assert_eq!(world.per_ip.count(ip), 0);
        // A bad token is a 401, revoked or not: revocation is judged on verified tokens.
        let (_, bad) = world.decide(&parts(
            upgrade("/private").header("origin", "https://app.example.com"),
        ));
        assert_eq!(refusal(&bad), Some("token"));
        // By token id: only that token.
        let world = World::new(config(100));
        let _ = world
            .revocations
            .revoke(Target::TokenId("t-1".into()), hour)
            .await;
        let with_jti = |jti: &str| {
            let claims =
                serde_json::json!({ "sub": "bob", "jti": jti, "exp": token::unix_now() + 600 });
            let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
            let t = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
                .unwrap_or_default();
            parts(
                upgrade("/private")
                    .header("origin", "https://app.example.com")
                    .header("authorization", format!("Bearer {t}")),
            )
        };
        let (_, revoked) = world.decide(&with_jti("t-1"));
        assert_eq!(refusal(&revoked), Some("revoked"));
        let (_, other) = world.decide(&with_jti("t-2"));
        let Ok(admitted) = other else {
            panic!("refused: {:?}", refusal(&other));
        };
        assert_eq!(admitted.jti.as_deref(), Some("t-2"));
    }

    #[test]
    fn the_subject_cap_counts_per_subject_after_the_per_ip_cap() {
        let world = subject_cap_world();
        let as_user = |sub: &str| {
            parts(upgrade("/").header("authorization", format!("Bearer {}", token(sub))))
        };
        let (_, first) = world.decide(&as_user("alice"));
        assert!(first.as_ref().is_ok_and(|a| a.subject_permit.is_some()));
        let (facts, second) = world.decide(&as_user("alice"));
        assert_eq!(refusal(&second), Some("subject_cap"));
        assert_eq!(facts.subject.as_deref(), Some("alice"));
        let ip = IpKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 64);
        assert_eq!(
            world.per_ip.count(ip),
            1,
            "the refused one's per-IP slot is freed"
        );
        let (_, bob) = world.decide(&as_user("bob"));
        assert!(bob.is_ok());
        drop(first);
        let (_, again) = world.decide(&as_user("alice"));
        assert!(again.is_ok());
    }

    /// A world whose only route `/` takes HS256 JWTs, with `max_connections_per_subject: 1`.
    fn subject_cap_world() -> World {
        let yaml = format!(
            r#"
listeners: [{{ name: plain, bind: "127.0.0.1:0" }}]
limits: {{ max_connections_per_ip: 10, max_connections_per_subject: 1 }}
upstreams:
  echo: {{ backends: [{{ addr: "127.0.0.1:9" }}] }}
routes:
  - name: private
    match: {{ path_prefix: / }}
    upstream: echo
    auth: {{ jwt: {{ from: ["header:Authorization"], keys: [{{ alg: HS256, secret: "{SECRET}" }}] }} }}
"#
        );
        World::new(Config::from_yaml_str(&yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}")))
    }

    /// An upgrade of `/` carrying a JWT with `claims` (and an `exp` ten minutes away).
    fn with_claims(mut claims: serde_json::Value) -> request::Parts {
        claims["exp"] = serde_json::json!(token::unix_now() + 600);
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let t = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
            .unwrap_or_else(|e| panic!("{e}"));
        parts(upgrade("/").header("authorization", format!("Bearer {t}")))
    }

    #[test]
    fn the_subject_cap_counts_a_sub_per_issuer() {
        let world = subject_cap_world();
        let (_, a) = world.decide(&with_claims(
            serde_json::json!({ "sub": "alice", "iss": "https://a.example" }),
        ));
        assert!(a.is_ok(), "{:?}", refusal(&a));
        let (_, b) = world.decide(&with_claims(
            serde_json::json!({ "sub": "alice", "iss": "https://b.example" }),
        ));
        assert!(b.is_ok(), "another issuer's alice: {:?}", refusal(&b));
        let (_, again) = world.decide(&with_claims(
            serde_json::json!({ "sub": "alice", "iss": "https://a.example" }),
        ));
        assert_eq!(refusal(&again), Some("subject_cap"));
    }

    #[tokio::test]
    async fn a_numeric_sub_is_capped_and_revoked_as_its_decimal_text() {
        use crate::ops::revocation::{RevocationStore, Target};
        let world = subject_cap_world();
        let (facts, first) = world.decide(&with_claims(serde_json::json!({ "sub": 42 })));
        assert!(first.as_ref().is_ok_and(|a| a.subject_permit.is_some()));
        assert_eq!(facts.subject.as_deref(), Some("42"));
        let (_, second) = world.decide(&with_claims(serde_json::json!({ "sub": 42 })));
        assert_eq!(refusal(&second), Some("subject_cap"));
        let (_, text) = world.decide(&with_claims(serde_json::json!({ "sub": "42" })));
        assert_eq!(
            refusal(&text),
            Some("subject_cap"),
            "42 and \"42\" are one subject"
        );
        drop(first);
        let _ = world
            .revocations
            .revoke(Target::Subject("42".into()), Duration::from_secs(60))
            .await;
        let (_, revoked) = world.decide(&with_claims(serde_json::json!({ "sub": 42 })));
        assert_eq!(refusal(&revoked), Some("revoked"));
        let _ = world
            .revocations
            .revoke(Target::TokenId("7".into()), Duration::from_secs(60))
            .await;
        let (_, by_jti) = world.decide(&with_claims(serde_json::json!({ "sub": "x", "jti": 7 })));
        assert_eq!(refusal(&by_jti), Some("revoked"));
        // No `sub`: no subject, so no subject cap.
        let (_, a) = world.decide(&with_claims(serde_json::json!({})));
        let (_, b) = world.decide(&with_claims(serde_json::json!({})));
        assert!(a.is_ok() && b.is_ok());
    }

    #[test]
    fn refusals_name_the_route_when_one_matched() {
        let world = World::new(config(100));
        let (facts, decided) = world.decide_with(
            &private(upgrade("/private/x?access_token=secret")),
            &world.limiters(true, false),
            EarlyPermit::NotTaken,
        );
        assert_eq!(refusal(&decided), Some("draining"));
        assert_eq!(facts.route.as_deref(), Some("private"));
        assert_eq!(facts.subject, None);
    }
}
