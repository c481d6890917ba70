//! The per-subject connection cap (SPEC §2 `limits.max_connections_per_subject`): whom a
//! connection belongs to, and its slot as an RAII permit counted like the per-IP one
//! ([`ConnLimiter`]). Per process; a fleet-wide count is SPEC §10's.

use std::sync::Arc;

use super::Refusal;
use super::ip_limit::{ConnLimiter, ConnPermit};

/// A connection's subject: the JWT `sub`, else the API key (its line in `keys_file`).
/// The two never collide: a JWT whose `sub` reads like a line number is still a JWT
/// subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubjectKey {
    Jwt(Box<str>),
    ApiKey(u32),
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
        let alice = || SubjectKey::Jwt("alice".into());
        let a = l.admit(alice(), 2);
        let b = l.admit(alice(), 2);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(l.admit(alice(), 2).err(), Some(Refusal::SubjectCap));
        assert!(l.admit(SubjectKey::Jwt("3".into()), 1).is_ok());
        let key3 = l.admit(SubjectKey::ApiKey(3), 1);
        assert!(key3.is_ok());
        assert_eq!(
            l.admit(SubjectKey::ApiKey(3), 1).err(),
            Some(Refusal::SubjectCap)
        );
        drop(a);
        assert!(l.admit(alice(), 2).is_ok());
        drop((b, key3));
        assert_eq!(l.count(alice()), 0);
        assert!(l.is_empty());
    }
}
