//! The index hash's spread for IDs of one format, over many handles' seeds (a review of the
//! shared cache found that IDs whose differences sit in a few adjacent bits of one word, such as
//! big-endian counters or binary UUIDs with a counter, fell into a fraction of the sets for some
//! seeds: with the seed drawn per handle, about one handle in a hundred lost 10% or more of
//! their hits, and one in two thousand lost 60%).

use super::*;

/// splitmix64: the seeds of the handles simulated here (fixed, so a failure reproduces).
fn seed(i: u64) -> u64 {
    let mut z = i
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How many of `ids` hit after all were filled once into a fresh cache of `capacity` slots.
fn hits(capacity: usize, seed: u64, ids: &[Vec<u8>]) -> usize {
    let c = LookupCache::new(capacity, seed);
    let hint = |i: usize| Hint {
        slot: i as u32,
        gen: 1,
        tag: [i as u64, 0],
    };
    for (i, id) in ids.iter().enumerate() {
        let key = c.key(id).expect("cacheable");
        c.put(&key, id, hint(i));
    }
    ids.iter()
        .enumerate()
        .filter(|&(i, id)| match c.probe(id) {
            Probe::Hit(h) => {
                assert_eq!(h, hint(i));
                true
            }
            _ => false,
        })
        .count()
}

/// As many IDs as a 256-slot table has slots (1024 entries in 256 sets of 4): a uniform hash
/// keeps about 253 of 256 (the fewest over 2000 seeds: 246-250 for each format below). The
/// bound, 240, leaves room for chance and fails for the folded multiply without a finaliser
/// (its fewest over these 300 seeds: 190-230, depending on the format).
#[test]
fn ids_of_one_format_spread_over_the_sets_for_every_seed() {
    let n = 256u64;
    let formats: [(&str, Vec<Vec<u8>>); 4] = [
        (
            "u64 big-endian counter",
            (0..n).map(|i| i.to_be_bytes().to_vec()).collect(),
        ),
        (
            "16-byte binary UUID, counter in the last 8 bytes",
            (0..n)
                .map(|i| {
                    let mut id = vec![0x5a; 16];
                    id[8..].copy_from_slice(&i.to_be_bytes());
                    id
                })
                .collect(),
        ),
        (
            "u64 little-endian multiple of 4096",
            (0..n).map(|i| (i << 12).to_le_bytes().to_vec()).collect(),
        ),
        (
            "u32 big-endian counter",
            (0..n as u32).map(|i| i.to_be_bytes().to_vec()).collect(),
        ),
    ];
    let worst: Vec<(&str, usize, u64)> = formats
        .iter()
        .map(|(name, ids)| {
            let (hits, i) = (0..300)
                .map(|i| (hits(256, seed(i), ids), i))
                .min()
                .unwrap();
            (*name, hits, i)
        })
        .collect();
    assert!(
        worst.iter().all(|&(_, hits, _)| hits >= 240),
        "the fewest hits of {n} IDs over 300 seeds (format, hits, seed #): {worst:?}"
    );
}
