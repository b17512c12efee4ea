//! Hash maps and sets keyed by block and page numbers.
//!
//! The serving path looks up several maps per block written (pending
//! writes, held versions, the stage's overlay); with the default SipHash
//! the hashing alone was a tenth of the commit thread's time under
//! sequential writes. A multiply by an odd constant, folded so that the low
//! bits the table indexes by depend on every bit of the key, costs a
//! couple of cycles. Block numbers come from the guest, so the multiply
//! starts from a per-process random value: a guest cannot precompute
//! colliding keys, and the worst a guest could do is slow its own disk.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// A map keyed by block or page number.
pub type IntMap<V> = HashMap<u64, V, IntHash>;
/// A set of block or page numbers.
pub type IntSet = HashSet<u64, IntHash>;

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// Builds [`IntHasher`]s seeded with this process's random value.
#[derive(Clone, Copy, Debug)]
pub struct IntHash {
    seed: u64,
}

impl Default for IntHash {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        let seed = *SEED.get_or_init(|| RandomState::new().hash_one(0x7477_696e_7375_6d00u64));
        IntHash { seed }
    }
}

impl BuildHasher for IntHash {
    type Hasher = IntHasher;
    fn build_hasher(&self) -> IntHasher {
        IntHasher(self.seed)
    }
}

/// See the module documentation.
pub struct IntHasher(u64);

/// The 128-bit product folded onto 64 bits: every output bit depends on
/// every input bit, in one multiply.
fn fold(x: u64) -> u64 {
    let m = u128::from(x) * u128::from(MUL);
    (m as u64) ^ ((m >> 64) as u64)
}

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = fold(self.0 ^ n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys with a common stride (the first blocks of 128 KiB writes, the
    /// pages of a sequential run) must not share their low bits, which
    /// is all a table of that size looks at.
    #[test]
    fn strided_keys_spread_over_the_low_bits() {
        let h = IntHash::default();
        for stride in [1u64, 32, 512, 1 << 20] {
            let mut seen = IntSet::default();
            for k in 0..4096u64 {
                seen.insert(h.hash_one(k * stride) & 0xfff);
            }
            // 4096 keys into 4096 buckets at random fill about 63%.
            assert!(seen.len() > 2200, "stride {stride}: {} buckets", seen.len());
        }
    }
}
