//! Who may change state through the admin listener (SPEC §2 `admin.token`, §7): reads
//! (GET, HEAD) are open to whoever reaches the listener; every other method needs
//! `Authorization: Bearer <admin.token>` (compared in constant time), is served without a
//! token only when the listener is bound to loopback, and is refused outright when it
//! carries an `Origin` header (a browser page, i.e. cross-site request forgery).

use http::{HeaderMap, Method, StatusCode, header};

use crate::config::{Admin, AdminToken};

/// The admin listener's policy for state-changing requests, fixed at start.
#[derive(Debug, Clone)]
pub struct Guard {
    token: Option<AdminToken>,
    loopback: bool,
}

/// Why a request was refused: the status and a one-line body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A browser's request (`Origin`): 403.
    Origin,
    /// A token is configured and the request lacks it: 401 with `WWW-Authenticate`.
    Unauthorized,
    /// No token is configured and the listener is not on loopback: 403.
    NoToken,
}

impl Denied {
    pub fn status(self) -> StatusCode {
        match self {
            Denied::Unauthorized => StatusCode::UNAUTHORIZED,
            Denied::Origin | Denied::NoToken => StatusCode::FORBIDDEN,
        }
    }

    pub fn body(self) -> &'static str {
        match self {
            Denied::Origin => "requests with an Origin header may not change state\n",
            Denied::Unauthorized => "admin token required: Authorization: Bearer <admin.token>\n",
            Denied::NoToken => {
                "admin.token is not set and admin.bind is not a loopback address: state-changing endpoints are off\n"
            }
        }
    }
}

impl Guard {
    pub fn new(admin: &Admin) -> Guard {
        Guard {
            token: admin.token.clone(),
            loopback: admin.bind.ip().is_loopback(),
        }
    }

    /// Whether a request may go on.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), Denied> {
        if *method == Method::GET || *method == Method::HEAD {
            return Ok(());
        }
        if headers.contains_key(header::ORIGIN) {
            return Err(Denied::Origin);
        }
        match &self.token {
            Some(token) => match bearer(headers) {
                Some(presented) if token.matches(presented) => Ok(()),
                _ => Err(Denied::Unauthorized),
            },
            None if self.loopback => Ok(()),
            None => Err(Denied::NoToken),
        }
    }
}

/// The credentials of the one `Authorization: Bearer` header (scheme case-insensitive,
/// RFC 9110 §11.1); `None` when absent, repeated or of another scheme.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let value = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let v = value.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(bind: &str, token: Option<&str>) -> Guard {
        let bind = bind.parse().unwrap_or_else(|e| panic!("{e}"));
        Guard::new(&Admin {
            bind,
            token: token.map(AdminToken::new),
        })
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().unwrap_or_else(|e| panic!("{e}")));
        }
        h
    }

    #[test]
    fn reads_are_open_and_changes_need_the_token() {
        let g = guard("0.0.0.0:9090", Some("s3cret-token"));
        assert_eq!(g.check(&Method::GET, &headers(&[])), Ok(()));
        let post = |h: &[(&'static str, &str)]| g.check(&Method::POST, &headers(h));
        assert_eq!(post(&[]), Err(Denied::Unauthorized));
        assert_eq!(
            post(&[("authorization", "Bearer wrong")]),
            Err(Denied::Unauthorized)
        );
        assert_eq!(post(&[("authorization", "Bearer s3cret-token")]), Ok(()));
        assert_eq!(post(&[("authorization", "bearer  s3cret-token ")]), Ok(()));
        assert_eq!(
            post(&[("authorization", "Basic s3cret-token")]),
            Err(Denied::Unauthorized)
        );
        assert_eq!(
            post(&[
                ("authorization", "Bearer s3cret-token"),
                ("authorization", "Bearer x")
            ]),
            Err(Denied::Unauthorized)
        );
        assert_eq!(
            post(&[
                ("authorization", "Bearer s3cret-token"),
                ("origin", "https://a.example")
            ]),
            Err(Denied::Origin)
        );
        assert_eq!(
            g.check(
                &Method::DELETE,
                &headers(&[("authorization", "Bearer s3cret")])
            ),
            Err(Denied::Unauthorized)
        );
    }

    #[test]
    fn without_a_token_changes_are_served_on_loopback_only() {
        let local = guard("127.0.0.1:9090", None);
        assert_eq!(local.check(&Method::POST, &headers(&[])), Ok(()));
        assert_eq!(
            local.check(&Method::POST, &headers(&[("origin", "null")])),
            Err(Denied::Origin)
        );
        let v6 = guard("[::1]:9090", None);
        assert_eq!(v6.check(&Method::DELETE, &headers(&[])), Ok(()));
        let open = guard("0.0.0.0:9090", None);
        assert_eq!(
            open.check(&Method::POST, &headers(&[])),
            Err(Denied::NoToken)
        );
        assert_eq!(open.check(&Method::GET, &headers(&[])), Ok(()));
    }
}
