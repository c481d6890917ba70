//! The per-subject connection cap (SPEC §2 `limits.max_connections_per_subject`): whom a
//! connection belongs to, and its slot as an RAII permit counted like the per-IP one
//! ([`ConnLimiter`]). Per process; a fleet-wide count is SPEC §10's.

use std::sync::Arc;

use super::Refusal;
use super::ip_limit::{ConnLimiter, ConnPermit};

/// A connection's subject: the JWT's (`iss`, `sub`), else the API key. The two never
/// collide: a JWT whose `sub` reads like a key's hash is still a JWT subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubjectKey {
    /// The same `sub` from two issuers is two subjects (RFC 7519 §4.1.2: `sub` is unique
    /// per issuer); a token without `iss` has `None`. Routes share a subject's count.
    Jwt {
        iss: Option<Box<str>>,
        sub: Box<str>,
    },
    /// The key's SHA-256: one key is one subject whichever route's keys file lists it,
    /// and keys on the same line of two files are two.
    ApiKey([u8; 32]),
}

impl SubjectKey {
    /// A JWT subject.
    pub fn jwt(iss: Option<&str>, sub: &str) -> SubjectKey {
        SubjectKey::Jwt {
            iss: iss.map(Into::into),
            sub: sub.into(),
        }
    }
}

/// Connections per subject.
pub type SubjectLimiter = ConnLimiter<SubjectKey>;

/// One connection's slot in the per-subject table.
pub type SubjectPermit = ConnPermit<SubjectKey>;

impl ConnLimiter<SubjectKey> {
    /// Takes one of `key`'s `cap` slots: 429 `subject_cap` when all are taken.
    pub fn admit(self: &Arc<Self>, key: SubjectKey, cap: u32) -> Result<SubjectPermit, Refusal> {
        self.try_acquire(key, cap).ok_or(Refusal::SubjectCap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_holds_at_most_cap_slots_and_jwt_and_api_key_subjects_are_apart() {
        let l = SubjectLimiter::new();
        let alice = || SubjectKey::jwt(Some("https://idp.example"), "alice");
        let a = l.admit(alice(), 2);
        let b = l.admit(alice(), 2);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(l.admit(alice(), 2).err(), Some(Refusal::SubjectCap));
        // The same `sub` from another issuer, or from a token without `iss`, is another.
        let other = l.admit(SubjectKey::jwt(Some("https://other.example"), "alice"), 1);
        assert!(other.is_ok());
        assert!(l.admit(SubjectKey::jwt(None, "alice"), 1).is_ok());
        let key3 = l.admit(SubjectKey::ApiKey([3; 32]), 1);
        assert!(key3.is_ok());
        assert_eq!(
            l.admit(SubjectKey::ApiKey([3; 32]), 1).err(),
            Some(Refusal::SubjectCap)
        );
        assert!(l.admit(SubjectKey::ApiKey([4; 32]), 1).is_ok());
        drop(other);
        drop(a);
        assert!(l.admit(alice(), 2).is_ok());
        drop((b, key3));
        assert_eq!(l.count(alice()), 0);
        assert!(l.is_empty());
    }
}
