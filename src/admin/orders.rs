//! The queries of `/connections/close` and `/revoke` (SPEC §7), read into what the
//! revocation store acts on. Pure: every rule is unit-tested here, and errors are one line
//! naming the fix (they are the 400's body).

use std::net::IpAddr;
use std::time::Duration;

use crate::admission::client_ip::normalise;
use crate::config::units::{fmt_duration, parse_duration};
use crate::http_util::percent_decode;
use crate::ops::registry::Selector;
use crate::ops::revocation::{MAX_KEY_LEN, Target};
use crate::outcome::Ending;

/// `for` when `/revoke` names none.
pub const DEFAULT_REVOKE_FOR: Duration = Duration::from_secs(3600);
/// Longest `for`: a revocation meant to be permanent belongs at the token issuer.
pub const MAX_REVOKE_FOR: Duration = Duration::from_secs(30 * 86_400);

/// The query's `name=value` pairs, percent-decoded; an empty query has none.
fn pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(n).into_owned(),
                percent_decode(&v.replace('+', " ")).into_owned(),
            )
        })
        .collect()
}

/// `/connections/close?subject=S|ip=A|route=R|conn_id=I[&code=4003]`: exactly one
/// selector, and the close code the client gets.
pub fn close_order(query: Option<&str>) -> Result<(Selector, u16), String> {
    let mut selector = None;
    let mut code = None;
    for (name, value) in pairs(query) {
        let picked = match name.as_str() {
            "subject" => Selector::Subject(non_empty(&name, value)?),
            // As the registry holds it: `::ffff:192.0.2.7` (a dual-stack socket's) is
            // 192.0.2.7.
            "ip" => Selector::Ip(normalise(value.trim().parse::<IpAddr>().map_err(|_| {
                format!("ip: `{}` is not an IP address", value.escape_debug())
            })?)),
            "route" => Selector::Route(non_empty(&name, value)?),
            "conn_id" => Selector::ConnId(non_empty(&name, value)?),
            "code" => {
                if code.replace(close_code(&value)?).is_some() {
                    return Err("code: name it once".into());
                }
                continue;
            }
            _ => return Err(unknown(&name, "subject, ip, route, conn_id, code")),
        };
        if selector.replace(picked).is_some() {
            return Err("name exactly one of subject, ip, route, conn_id".into());
        }
    }
    let selector =
        selector.ok_or("name one of subject=, ip=, route=, conn_id= (e.g. ?subject=user-42)")?;
    Ok((selector, code.unwrap_or(Ending::REVOKED_CODE)))
}

/// `POST /revoke?subject=S|jti=J[&for=1h]`: exactly one target, and for how long.
pub fn revoke_order(query: Option<&str>) -> Result<(Target, Duration), String> {
    let (target, ttl) = target_order(query, true)?;
    Ok((target, ttl.unwrap_or(DEFAULT_REVOKE_FOR)))
}

/// `DELETE /revoke?subject=S|jti=J`: exactly one target; a `for` is ignored, unread.
pub fn lift_order(query: Option<&str>) -> Result<Target, String> {
    target_order(query, false).map(|(target, _)| target)
}

/// The target of `/revoke`, and its `for` when `read_for` (else `for` is skipped).
fn target_order(query: Option<&str>, read_for: bool) -> Result<(Target, Option<Duration>), String> {
    let mut target = None;
    let mut ttl = None;
    for (name, value) in pairs(query) {
        let picked = match name.as_str() {
            "subject" => Target::Subject(non_empty(&name, value)?),
            "jti" => Target::TokenId(non_empty(&name, value)?),
            "for" if !read_for => continue,
            "for" => {
                if ttl.replace(revoke_for(&value)?).is_some() {
                    return Err("for: name it once".into());
                }
                continue;
            }
            _ => return Err(unknown(&name, "subject, jti, for")),
        };
        if target.replace(picked).is_some() {
            return Err("name exactly one of subject, jti".into());
        }
    }
    let target = target.ok_or("name one of subject=, jti= (e.g. ?subject=user-42&for=1h)")?;
    Ok((target, ttl))
}

/// A revocation's `for`: from 1s to [`MAX_REVOKE_FOR`].
fn revoke_for(value: &str) -> Result<Duration, String> {
    let ttl = parse_duration(value).map_err(|e| format!("for: {e}"))?;
    if ttl < Duration::from_secs(1) || ttl > MAX_REVOKE_FOR {
        return Err(format!(
            "for: between 1s and {}",
            fmt_duration(MAX_REVOKE_FOR)
        ));
    }
    Ok(ttl)
}

fn non_empty(name: &str, value: String) -> Result<String, String> {
    if value.is_empty() {
        return Err(format!("{name}: empty value"));
    }
    if value.len() > MAX_KEY_LEN {
        return Err(format!("{name}: longer than {MAX_KEY_LEN} bytes"));
    }
    Ok(value)
}

fn unknown(name: &str, known: &str) -> String {
    format!(
        "unknown parameter `{}`; use {known}",
        name.escape_debug()
            .to_string()
            .chars()
            .take(64)
            .collect::<String>()
    )
}

/// A close code the proxy may send (RFC 6455 §7.4): 1000, 1001, 1008, 1011–1013, or
/// 3000–4999 (registered and private codes).
fn close_code(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u16>() {
        Ok(c @ (1000 | 1001 | 1008 | 1011..=1013 | 3000..=4999)) => Ok(c),
        _ => Err(format!(
            "code: `{}` is not a close code the proxy sends; use 4003 (default), 1000, 1001, 1008, 1011-1013 or 3000-4999",
            value.escape_debug()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_names_one_selector_and_maybe_a_code() {
        assert_eq!(
            close_order(Some("subject=user%2042")),
            Ok((Selector::Subject("user 42".into()), 4003))
        );
        assert_eq!(
            close_order(Some("ip=203.0.113.7&code=4000")),
            Ok((Selector::Ip([203, 0, 113, 7].into()), 4000))
        );
        assert_eq!(
            close_order(Some("code=1012&route=chat")),
            Ok((Selector::Route("chat".into()), 1012))
        );
        assert_eq!(
            close_order(Some("conn_id=01JD")),
            Ok((Selector::ConnId("01JD".into()), 4003))
        );
        // An IPv4-mapped address is the IPv4 address the registry holds.
        assert_eq!(
            close_order(Some("ip=::ffff:127.0.0.1")),
            Ok((Selector::Ip([127, 0, 0, 1].into()), 4003))
        );
        for bad in [
            None,
            Some(""),
            Some("code=4003"),
            Some("subject=a&route=b"),
            Some("subject="),
            Some("ip=nope"),
            Some("subject=a&code=1005"),
            Some("subject=a&code=1006"),
            Some("subject=a&code=5000"),
            Some("subject=a&code=x"),
            Some("user=a"),
            Some("subject=a&code=4000&code=4001"),
            Some("subject=a&code=4000&code=4000"),
        ] {
            assert!(close_order(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_revocation_names_one_target_and_a_bounded_time() {
        assert_eq!(
            revoke_order(Some("subject=alice&for=2h")),
            Ok((Target::Subject("alice".into()), Duration::from_secs(7200)))
        );
        assert_eq!(
            revoke_order(Some("jti=abc")),
            Ok((Target::TokenId("abc".into()), DEFAULT_REVOKE_FOR))
        );
        for bad in [
            None,
            Some("for=1h"),
            Some("subject=a&jti=b"),
            Some("subject=a&for=0s"),
            Some("subject=a&for=500ms"),
            Some("subject=a&for=1h&for=2h"),
            Some("subject=a&for=31d"),
            Some("subject=a&for=soon"),
            Some("ip=1.2.3.4"),
        ] {
            assert!(revoke_order(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            revoke_order(Some("subject=a&for=1s")),
            Ok((Target::Subject("a".into()), Duration::from_secs(1)))
        );
    }

    #[test]
    fn a_lift_names_one_target_and_ignores_for() {
        for query in ["jti=abc", "jti=abc&for=soon", "for=0s&jti=abc&for=1h"] {
            assert_eq!(
                lift_order(Some(query)),
                Ok(Target::TokenId("abc".into())),
                "{query}"
            );
        }
        for bad in [
            None,
            Some("for=1h"),
            Some("subject=a&jti=b"),
            Some("ip=1.2.3.4"),
        ] {
            assert!(lift_order(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_subject_or_token_id_is_at_most_1_kib() {
        let at_most = "a".repeat(MAX_KEY_LEN);
        let longer = "a".repeat(MAX_KEY_LEN + 1);
        for name in ["subject", "jti"] {
            assert!(revoke_order(Some(&format!("{name}={at_most}"))).is_ok());
            let err = revoke_order(Some(&format!("{name}={longer}")));
            assert_eq!(err, Err(format!("{name}: longer than 1024 bytes")));
        }
        assert!(close_order(Some(&format!("subject={longer}"))).is_err());
    }
}
