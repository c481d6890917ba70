//! Sticky placement: weighted rendezvous (highest-random-weight) hashing over a stable,
//! documented 64-bit hash, so every wsgate instance (and any other implementation) with
//! the same backend list puts the same key on the same backend without talking to the
//! others. Pure functions only (a leaf: it imports nothing of wsgate); health, drain and
//! load live in the pool module, which calls these.
//!
//! # The exact rule (reproducible elsewhere)
//! - hash: XXH64 (xxHash, 64-bit; the same family Envoy uses for its hash policies),
//!   little-endian reads, as in the reference implementation;
//! - a backend's identity is its resolved socket address as text: `10.0.0.7:9001`,
//!   `[2001:db8::7]:9001` (Rust's `SocketAddr` display: IPv6 compressed, in brackets, no
//!   scope id), so two instances resolving a name to the same records agree;
//! - `seed = XXH64(identity bytes, seed 0)`; `h = XXH64(key bytes, seed)`;
//! - `u = ((h >> 11) + 0.5) / 2^53`, which lies strictly inside (0, 1);
//! - `score = weight / -ln(u)`; backends are tried in decreasing score (ties, which need
//!   equal 64-bit hashes, go to the lower identity in byte order).
//!
//! Why this works: `-ln(u)/weight` is exponentially distributed with rate `weight`, so the
//! smallest one (our highest score) belongs to each backend with probability
//! `weight / Σ weights`; and a key's scores do not depend on the other backends, so adding
//! or removing one moves only the keys that it wins or held.

/// XXH64 primes (xxHash specification).
const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn read64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u64::from(u32::from_le_bytes(a))
}

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `data` with `seed`, written from the xxHash specification.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, read64(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u64);
    while rest.len() >= 8 {
        h ^= round(0, read64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h ^= read32(rest).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &byte in rest {
        h ^= u64::from(byte).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// The per-backend seed: computed once per backend, not per connection.
pub fn backend_seed(identity: &str) -> u64 {
    xxh64(identity.as_bytes(), 0)
}

/// A backend's rendezvous score for `key` (higher wins).
pub fn score(seed: u64, weight: u32, key: &[u8]) -> f64 {
    let h = xxh64(key, seed);
    // 53 bits fill an f64 mantissa exactly; the +0.5 keeps u away from 0 and 1, so the
    // logarithm is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -u.ln()
}

/// Indices of `members` (seed, weight), best first for `key`. `members` must be sorted by
/// identity for the tie rule to hold; the sort is stable, so equal scores keep that order.
pub fn rank(key: &[u8], members: &[(u64, u32)]) -> Vec<usize> {
    let scores: Vec<f64> = members.iter().map(|&(s, w)| score(s, w, key)).collect();
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(ids: &[&str], weights: &[u32]) -> Vec<(u64, u32)> {
        ids.iter()
            .zip(weights)
            .map(|(id, &w)| (backend_seed(id), w))
            .collect()
    }

    fn five() -> Vec<String> {
        (1..=5).map(|i| format!("10.0.0.{i}:9001")).collect()
    }

    #[test]
    fn xxh64_matches_the_reference_vectors() {
        // From the reference implementation (python-xxhash); every length path is hit:
        // empty, 1, 3 bytes, 6 (4 + 2), 32 (one stripe), 43 (stripe + 8 + 3).
        let cases: [(&[u8], u64, u64); 6] = [
            (b"", 0xef46_db37_51d8_e999, 0x98b1_582b_0977_e704),
            (b"a", 0xd24e_c4f1_a98c_6e5b, 0x88e4_fe59_adf7_b0cc),
            (b"abc", 0x44bc_2cf5_ad77_0999, 0x13c1_d910_7027_70e6),
            (b"wsgate", 0x3c6b_7da0_e10d_2649, 0x3065_ec9c_5723_ae97),
            (
                b"0123456789abcdef0123456789abcdef",
                0x642a_9495_8e71_e6c5,
                0x666b_1f69_d245_5da5,
            ),
            (
                b"The quick brown fox jumps over the lazy dog",
                0x0b24_2d36_1fda_71bc,
                0xaa9f_288a_8baa_3d3f,
            ),
        ];
        for (data, seed0, seed42) in cases {
            assert_eq!(xxh64(data, 0), seed0, "{data:?}");
            assert_eq!(xxh64(data, 42), seed42, "{data:?}");
        }
    }

    /// Pins key → backend placement: if this fails, every deployed sticky mapping would
    /// move on upgrade. Change it only on purpose, with a release note.
    #[test]
    fn placement_is_pinned() {
        let ids = five();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let m = members(&ids, &[1, 1, 1, 1, 1]);
        let got: Vec<usize> = ["user-1", "user-2", "user-3", "room:42", "203.0.113.7", ""]
            .iter()
            .map(|k| rank(k.as_bytes(), &m)[0])
            .collect();
        assert_eq!(got, GOLDEN_EQUAL);
        let weighted = members(&ids, &[1, 2, 3, 4, 5]);
        let order = rank(b"user-1", &weighted);
        assert_eq!(order, GOLDEN_ORDER);
    }

    // Reproduced independently with python-xxhash and the formula in the module doc.
    const GOLDEN_EQUAL: [usize; 6] = [1, 3, 3, 2, 1, 0];
    const GOLDEN_ORDER: [usize; 5] = [4, 1, 3, 2, 0];

    #[test]
    fn keys_spread_within_two_points_of_the_weights() {
        let ids = five();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let weights = [1, 2, 3, 4, 10];
        let m = members(&ids, &weights);
        let mut counts = [0usize; 5];
        let n = 10_000;
        for i in 0..n {
            counts[rank(format!("key-{i}").as_bytes(), &m)[0]] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (i, &c) in counts.iter().enumerate() {
            let share = c as f64 / n as f64;
            let want = f64::from(weights[i]) / f64::from(total);
            assert!(
                (share - want).abs() < 0.02,
                "backend {i}: {share} vs {want}"
            );
        }
    }

    #[test]
    fn removing_one_of_five_moves_only_its_keys() {
        let ids = five();
        let all: Vec<&str> = ids.iter().map(String::as_str).collect();
        let before = members(&all, &[1; 5]);
        let after = members(&all[..4], &[1; 4]); // 10.0.0.5 removed
        let n = 10_000;
        let mut moved = 0;
        for i in 0..n {
            let key = format!("key-{i}");
            let was = rank(key.as_bytes(), &before)[0];
            let now = rank(key.as_bytes(), &after)[0];
            if was != now {
                assert_eq!(was, 4, "{key} moved off a backend that stayed");
                moved += 1;
            }
        }
        let share = moved as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.02, "{share}");
    }

    #[test]
    fn the_next_choice_is_the_choice_without_the_first() {
        // Failover order equals "what if the first were gone": other instances that saw
        // the first backend die choose the same second backend.
        let ids = five();
        let all: Vec<&str> = ids.iter().map(String::as_str).collect();
        let m = members(&all, &[1, 2, 1, 3, 1]);
        for i in 0..500 {
            let key = format!("k{i}");
            let order = rank(key.as_bytes(), &m);
            let rest: Vec<&str> = all
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != order[0])
                .map(|(_, id)| *id)
                .collect();
            let rest_w: Vec<u32> = [1, 2, 1, 3, 1]
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != order[0])
                .map(|(_, w)| *w)
                .collect();
            let second = rest[rank(key.as_bytes(), &members(&rest, &rest_w))[0]];
            assert_eq!(all[order[1]], second);
        }
    }

    proptest! {
        #[test]
        fn rank_is_a_permutation_and_removal_moves_only_the_removed(
            n in 1usize..12,
            weights in proptest::collection::vec(1u32..100, 12),
            key in proptest::collection::vec(any::<u8>(), 0..40),
            removed in 0usize..12,
        ) {
            let ids: Vec<String> = (0..n).map(|i| format!("192.0.2.{i}:80")).collect();
            let m: Vec<(u64, u32)> = ids.iter().zip(&weights).map(|(id, &w)| (backend_seed(id), w)).collect();
            let mut order = rank(&key, &m);
            let first = order[0];
            order.sort_unstable();
            prop_assert_eq!(order, (0..n).collect::<Vec<_>>());
            let removed = removed % n;
            if n > 1 && removed != first {
                let mut rest = m.clone();
                rest.remove(removed);
                let now = rank(&key, &rest)[0];
                let now = if now >= removed { now + 1 } else { now };
                prop_assert_eq!(now, first);
            }
        }
    }
}
