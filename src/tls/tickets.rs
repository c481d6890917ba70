//! TLS session tickets (SPEC §2 `session_tickets`, `ticket_keys`): which ticketer a
//! listener's rustls configuration gets.
//!
//! - `session_tickets: false`: no resumption at all (no tickets, no session cache);
//! - default: one process-wide ticketer with keys rustls generates and rotates itself
//!   (shared by every listener and kept across reloads, so a SIGHUP does not invalidate
//!   the tickets clients hold);
//! - `ticket_keys: FILE`: keys from a file that every instance of a fleet shares, so a
//!   client resumes on whichever instance an L4 balancer sends it to. The file holds one
//!   key per line, 64 hex digits (32 bytes); `#` comments and blank lines are ignored.
//!   The first key seals new tickets; every key opens them (rotation: put a new key
//!   first, keep the old ones for a ticket lifetime). Read again on SIGHUP.
//!
//! A shared-key ticket is `id (4 bytes) ‖ nonce (12) ‖ AES-256-GCM(state) ‖ tag (16)`,
//! the id being the first four bytes of the key's SHA-256 and the associated data.

use std::sync::{Arc, OnceLock};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;
use sha2::{Digest, Sha256};

/// Lifetime hint given to clients with each shared-key ticket (6 hours): how long a key
/// should stay in the file after it stopped being the first.
pub const SHARED_TICKET_LIFETIME_SECS: u32 = 6 * 3600;

/// Longest ticket-keys file accepted (bytes): far more than any sane rotation needs.
const MAX_FILE: usize = 64 * 1024;

/// What a listener resumes with.
#[derive(Clone, Debug)]
pub enum Tickets {
    /// No resumption.
    Off,
    /// The process's own rotating keys.
    Rotating,
    /// Keys shared through a file.
    Shared(Arc<SharedKeys>),
}

/// The process-wide rotating ticketer (made once, shared by every config).
pub fn rotating() -> Result<Arc<dyn ProducesTickets>, String> {
    static ONE: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = ONE.get() {
        return Ok(t.clone());
    }
    let made = rustls::crypto::ring::Ticketer::new().map_err(|e| format!("ticketer: {e}"))?;
    Ok(ONE.get_or_init(|| made).clone())
}

struct Key {
    id: [u8; 4],
    key: LessSafeKey,
}

/// Ticket keys read from a `ticket_keys` file.
pub struct SharedKeys {
    keys: Vec<Key>,
    rng: SystemRandom,
}

impl std::fmt::Debug for SharedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("SharedKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl SharedKeys {
    /// Parses a ticket-keys file's text; the error names the line.
    pub fn parse(text: &[u8]) -> Result<SharedKeys, String> {
        if text.len() > MAX_FILE {
            return Err(format!("longer than {MAX_FILE} bytes"));
        }
        let text = std::str::from_utf8(text).map_err(|_| "not UTF-8 text".to_string())?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = hex32(line).ok_or_else(|| {
                format!(
                    "line {}: a ticket key is 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`",
                    i + 1
                )
            })?;
            let digest = Sha256::digest(bytes);
            let id = [digest[0], digest[1], digest[2], digest[3]];
            let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| format!("line {}: not an AES-256 key", i + 1))?;
            keys.push(Key {
                id,
                key: LessSafeKey::new(unbound),
            });
        }
        if keys.is_empty() {
            return Err("no key in the file; one key per line, 64 hex digits".into());
        }
        Ok(SharedKeys {
            keys,
            rng: SystemRandom::new(),
        })
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

impl ProducesTickets for SharedKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        SHARED_TICKET_LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.id),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let id = cipher.get(..4)?;
        let nonce = cipher.get(4..4 + NONCE_LEN)?;
        let body = cipher.get(4 + NONCE_LEN..)?;
        let key = self.keys.iter().find(|k| k.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = body.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(key.id), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn tickets_open_under_any_listed_key_and_only_those() {
        let old = SharedKeys::parse(A.as_bytes()).unwrap();
        let ticket = old.encrypt(b"session state").unwrap();
        assert_eq!(old.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        // Rotated: a new key first, the old one kept: old tickets still open.
        let rotated = SharedKeys::parse(format!("# new first\n{B}\n\n{A}\n").as_bytes()).unwrap();
        assert_eq!(
            rotated.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        assert_ne!(rotated.encrypt(b"x").unwrap()[..4], ticket[..4]);
        // Another fleet's key opens nothing; a tampered ticket neither; short input is None.
        let other = SharedKeys::parse(B.as_bytes()).unwrap();
        assert_eq!(other.decrypt(&ticket), None);
        let mut tampered = ticket.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert_eq!(old.decrypt(&tampered), None);
        for n in 0..ticket.len() {
            assert_eq!(old.decrypt(&ticket[..n]), None);
        }
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = SharedKeys::parse(format!("{A}\nnot-a-key\n").as_bytes()).unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(SharedKeys::parse(b"# only a comment\n").is_err());
        assert!(SharedKeys::parse(&A.as_bytes()[..63]).is_err());
        assert!(SharedKeys::parse(&[0xff, 0xfe]).is_err());
    }
}
