//! SipHash-1-3 with a 128-bit output, one-shot, specialised for the slot
//! tag of an ID (`index::tag_of`).
//!
//! Owns: nothing but the function. It computes exactly the value of the
//! reference definition (Aumasson and Bernstein's SipHash with one
//! compression round and three finalisation rounds, 128-bit output), which
//! `siphasher`'s `SipHasher13` (streaming, `finish128`) also computes: tags
//! are stored in table files, so the value must never change (tests below
//! and in `index.rs` compare the two for every ID length).
//!
//! Why a copy of the algorithm: the general implementation streams its
//! input through a tail buffer, assembles partial words byte by byte and
//! calls the finalisation out of line; this one reads the ID as whole
//! little-endian 8-byte words, builds the last partial word from at most
//! two (overlapping) loads, and inlines all ten rounds of a 24-byte ID into
//! the caller. Nothing is precomputed or cached, so the key stays the
//! table's secret and the result stays a PRF of the ID.

/// One SipRound on the four state words.
#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// The little-endian 8-byte word of `b[at..at + 8]` (`at + 8 <= b.len()`).
#[inline(always)]
fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The little-endian value of `b[at..at + 4]` (`at + 4 <= b.len()`).
#[inline(always)]
fn word32(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w) as u64
}

/// The last `b.len() % 8` bytes of `b` as a little-endian word (the bytes
/// that do not fill a whole word), zero above them. Two loads at most, no
/// loop: the last 8 bytes shifted down when the ID has a whole word, else
/// two overlapping 4-byte or three 1-byte loads.
#[inline(always)]
fn tail(b: &[u8]) -> u64 {
    let len = b.len();
    let rem = len % 8;
    if rem == 0 {
        0
    } else if len >= 8 {
        // The 8 bytes ending at the end; the `8 - rem` lowest belong to the
        // last whole word.
        word(b, len - 8) >> (8 * (8 - rem))
    } else if rem >= 4 {
        // Bytes 0..4 and rem-4..rem; the overlap holds the same bytes in
        // both, so OR-ing them is exact.
        word32(b, 0) | word32(b, rem - 4) << (8 * (rem - 4))
    } else {
        // rem is 1, 2 or 3: bytes 0, rem / 2 and rem - 1 (repeats overlap).
        b[0] as u64
            | (b[rem / 2] as u64) << (8 * (rem / 2))
            | (b[rem - 1] as u64) << (8 * (rem - 1))
    }
}

/// SipHash-1-3 of `msg` under the key `(k0, k1)`, 128-bit output as
/// `(h1, h2)`: the low and the high 64 bits, as `siphasher`'s `Hash128`.
#[inline]
pub(crate) fn sip13_128(k0: u64, k1: u64, msg: &[u8]) -> (u64, u64) {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        // 0xee: the 128-bit output variant.
        k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let whole = msg.len() & !7;
    let mut at = 0;
    while at < whole {
        let m = word(msg, at);
        v[3] ^= m;
        round(&mut v);
        v[0] ^= m;
        at += 8;
    }
    let b = ((msg.len() as u64) << 56) | tail(msg);
    v[3] ^= b;
    round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xee;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    let h1 = v[0] ^ v[1] ^ v[2] ^ v[3];
    v[1] ^= 0xdd;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    (h1, v[0] ^ v[1] ^ v[2] ^ v[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use siphasher::sip128::{Hasher128, SipHasher13};
    use std::hash::Hasher;

    fn reference(k0: u64, k1: u64, msg: &[u8]) -> (u64, u64) {
        let mut h = SipHasher13::new_with_keys(k0, k1);
        h.write(msg);
        let v = h.finish128();
        (v.h1, v.h2)
    }

    /// Every length up to 300 bytes (IDs are at most 256), several keys,
    /// and every starting offset of the input within a word (unaligned
    /// slices): the streamed reference value.
    #[test]
    fn equals_the_streamed_siphash_13_128_for_every_length_key_and_alignment() {
        let bytes: Vec<u8> = (0..320u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let keys = [
            (0, 0),
            (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908),
            (u64::MAX, 1),
            (0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F),
        ];
        for (k0, k1) in keys {
            for start in 0..8 {
                for len in 0..=300 {
                    let msg = &bytes[start..start + len];
                    assert_eq!(
                        sip13_128(k0, k1, msg),
                        reference(k0, k1, msg),
                        "key ({k0:#x}, {k1:#x}), offset {start}, length {len}"
                    );
                }
            }
        }
    }

    /// A tail byte of every value in every position of a short input (the
    /// overlapping loads must neither drop nor smear a byte).
    #[test]
    fn every_byte_of_a_partial_word_counts() {
        for len in 1..=23 {
            for at in 0..len {
                for b in [0u8, 1, 0x80, 0xff] {
                    let mut msg = vec![0x5au8; len];
                    msg[at] = b;
                    assert_eq!(
                        sip13_128(3, 4, &msg),
                        reference(3, 4, &msg),
                        "length {len}, byte {at} = {b:#x}"
                    );
                }
            }
        }
    }
}
