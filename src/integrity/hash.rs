//! The block checksum: xxh3-64 seeded by the format's salt and the block
//! number, so that a block written at the wrong place does not verify.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The reserved pair value meaning "this block reads as zeros".
pub const ZERO: u64 = 0;

// A real hash that collides with ZERO is stored as this instead.
const ZERO_REMAP: u64 = u64::MAX;

/// Checksum of `data`, the content of block `block`. Never returns [`ZERO`].
#[inline]
pub fn block_hash(salt: u64, block: u64, data: &[u8]) -> u64 {
    // Mixing the block number through a multiply spreads neighbouring block
    // numbers over the whole seed space.
    let seed = salt ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    match xxh3_64_with_seed(data, seed) {
        ZERO => ZERO_REMAP,
        h => h,
    }
}

/// Whether `data` (block `block`) matches the stored checksum `sum`.
#[inline]
pub fn matches(salt: u64, block: u64, data: &[u8], sum: u64) -> bool {
    if sum == ZERO {
        is_zero(data)
    } else {
        block_hash(salt, block, data) == sum
    }
}

/// Whether every byte of `data` is zero.
#[inline]
pub fn is_zero(data: &[u8]) -> bool {
    // Word-wise: the compiler vectorises this loop.
    let (head, body, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && body.iter().fold(0, |a, &w| a | w) == 0
        && tail.iter().all(|&b| b == 0)
}

/// Which slot of a pair `data` matches, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Old,
    Neither,
}

/// Verify `data` against both slots, hashing at most once.
#[inline]
pub fn verify(salt: u64, block: u64, data: &[u8], new: u64, old: u64) -> Verdict {
    let mut hash = None;
    let mut check = |sum: u64| {
        if sum == ZERO {
            is_zero(data)
        } else {
            *hash.get_or_insert_with(|| block_hash(salt, block, data)) == sum
        }
    };
    if check(new) {
        Verdict::New
    } else if check(old) {
        Verdict::Old
    } else {
        Verdict::Neither
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_block_number_and_salt() {
        let data = [7u8; 4096];
        assert_ne!(block_hash(1, 0, &data), block_hash(1, 1, &data));
        assert_ne!(block_hash(1, 0, &data), block_hash(2, 0, &data));
        assert_eq!(block_hash(1, 5, &data), block_hash(1, 5, &data));
    }

    #[test]
    fn zero_slot_verifies_only_zero_blocks() {
        let zeros = [0u8; 512];
        let mut one = [0u8; 512];
        one[511] = 1;
        assert!(matches(9, 3, &zeros, ZERO));
        assert!(!matches(9, 3, &one, ZERO));
        assert!(is_zero(&zeros[1..]));
        assert!(!is_zero(&one[3..]));
    }

    #[test]
    fn verify_prefers_new_then_old() {
        let a = [1u8; 512];
        let b = [2u8; 512];
        let (ha, hb) = (block_hash(0, 0, &a), block_hash(0, 0, &b));
        assert_eq!(verify(0, 0, &a, ha, hb), Verdict::New);
        assert_eq!(verify(0, 0, &b, ha, hb), Verdict::Old);
        assert_eq!(verify(0, 0, &[3u8; 512], ha, hb), Verdict::Neither);
    }
}
