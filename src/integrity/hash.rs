//! The block checksum, one of two algorithms chosen at format time:
//!
//! - xxh3-64 seeded by the format's salt and the block number: catches
//!   accidents (bit rot, lost, misdirected and torn writes);
//! - BLAKE3 in keyed mode over the data, the block number and the salt,
//!   truncated to 64 bits: also catches someone who can write the image
//!   and the metadata but does not hold the key.
//!
//! Both keep the block number inside, so a block written at the wrong place
//! does not verify, and both share the zero rules below.

use std::fmt;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::key::Key;
use crate::meta::{hash_name, Pair, Superblock, SuperblockError, HASH_BLAKE3_KEYED, HASH_XXH3};

/// The reserved pair value meaning "this block reads as zeros".
pub const ZERO: u64 = 0;

// A real hash that collides with ZERO is stored as this instead.
const ZERO_REMAP: u64 = u64::MAX;

/// The checksum algorithm of one disk, with its parameters. Cheap to copy,
/// so every thread that hashes holds its own.
#[derive(Clone, Copy)]
pub struct Checksum {
    salt: u64,
    alg: Alg,
}

#[derive(Clone, Copy)]
enum Alg {
    Xxh3,
    /// The block subkey of the disk's [`Key`].
    Blake3Keyed([u8; 32]),
}

impl fmt::Debug for Checksum {
    // The key stays out of logs and panics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checksum")
            .field("hash", &self.name())
            .field("salt", &format_args!("{:#018x}", self.salt))
            .finish()
    }
}

impl Checksum {
    /// xxh3-64 seeded by `salt` and the block number.
    pub fn xxh3(salt: u64) -> Self {
        Self {
            salt,
            alg: Alg::Xxh3,
        }
    }

    /// BLAKE3 keyed by `key`, over data, block number and `salt`.
    pub fn keyed(salt: u64, key: &Key) -> Self {
        Self {
            salt,
            alg: Alg::Blake3Keyed(*key.block_key()),
        }
    }

    /// The checksum a superblock names, given the key the caller holds.
    /// A keyed superblock needs a key and an unkeyed one refuses it (no
    /// silent downgrade either way); the MAC itself is checked when the
    /// superblock is decoded.
    pub fn of(sb: &Superblock, key: Option<&Key>) -> Result<Self, SuperblockError> {
        match (sb.hash_id, key) {
            (HASH_XXH3, None) => Ok(Self::xxh3(sb.salt)),
            (HASH_XXH3, Some(_)) => Err(SuperblockError::UnexpectedKey),
            (HASH_BLAKE3_KEYED, Some(k)) => Ok(Self::keyed(sb.salt, k)),
            (HASH_BLAKE3_KEYED, None) => Err(SuperblockError::KeyRequired),
            (other, _) => Err(SuperblockError::HashId(other)),
        }
    }

    /// The superblock's hash id of this algorithm.
    pub fn hash_id(&self) -> u32 {
        match self.alg {
            Alg::Xxh3 => HASH_XXH3,
            Alg::Blake3Keyed(_) => HASH_BLAKE3_KEYED,
        }
    }

    /// Its name in `info` and logs: "xxh3-64" or "blake3-keyed".
    pub fn name(&self) -> &'static str {
        hash_name(self.hash_id())
    }

    /// Checksum of `data`, the content of block `block`. Never returns
    /// [`ZERO`].
    #[inline]
    pub fn block_hash(&self, block: u64, data: &[u8]) -> u64 {
        let h = match &self.alg {
            Alg::Xxh3 => {
                // Mixing the block number through a multiply spreads
                // neighbouring block numbers over the whole seed space.
                let seed = self.salt ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                xxh3_64_with_seed(data, seed)
            }
            Alg::Blake3Keyed(key) => {
                // data || block || salt: unambiguous, as the block size is
                // fixed per disk (and MACed in its superblock). The data
                // goes first so that BLAKE3 hashes its whole 1 KiB chunks
                // in parallel; the fields first would cost a third.
                let mut h = blake3::Hasher::new_keyed(key);
                h.update(data);
                h.update(&block.to_le_bytes());
                h.update(&self.salt.to_le_bytes());
                let out = h.finalize();
                let mut first = [0u8; 8];
                first.copy_from_slice(&out.as_bytes()[..8]);
                u64::from_le_bytes(first)
            }
        };
        match h {
            ZERO => ZERO_REMAP,
            h => h,
        }
    }

    /// Whether `data` (block `block`) matches the stored checksum `sum`.
    #[inline]
    pub fn matches(&self, block: u64, data: &[u8], sum: u64) -> bool {
        if sum == ZERO {
            is_zero(data)
        } else {
            self.block_hash(block, data) == sum
        }
    }

    /// Verify `data` against both slots, hashing at most once.
    #[inline]
    pub fn verify(&self, block: u64, data: &[u8], new: u64, old: u64) -> Verdict {
        match self.find(block, data, [new, old]) {
            Some(s) if s == new => Verdict::New,
            Some(_) => Verdict::Old,
            None => Verdict::Neither,
        }
    }

    /// The first of `sums` that `data` (block `block`) matches, hashing at
    /// most once: a pair's slots, then the extra versions a metadata log
    /// of format version 3 names.
    #[inline]
    pub fn find(
        &self,
        block: u64,
        data: &[u8],
        sums: impl IntoIterator<Item = u64>,
    ) -> Option<u64> {
        let mut hash = None;
        sums.into_iter().find(|&sum| {
            if sum == ZERO {
                is_zero(data)
            } else {
                *hash.get_or_insert_with(|| self.block_hash(block, data)) == sum
            }
        })
    }

    /// Which checksum of block `block` `data` matches: its pair's slots,
    /// then its extra versions; hashing at most once.
    #[inline]
    pub fn find_version(&self, block: u64, data: &[u8], pair: Pair, extras: &[u64]) -> Option<u64> {
        let sums = [pair.new, pair.old].into_iter();
        self.find(block, data, sums.chain(extras.iter().copied()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> [Checksum; 2] {
        let key = Key::from_bytes(&[0x42; 32]).unwrap();
        [Checksum::xxh3(1), Checksum::keyed(1, &key)]
    }

    #[test]
    fn hash_depends_on_block_number_and_salt() {
        let data = [7u8; 4096];
        for c in both() {
            assert_ne!(c.block_hash(0, &data), c.block_hash(1, &data));
            let other_salt = Checksum { salt: 2, ..c };
            assert_ne!(c.block_hash(0, &data), other_salt.block_hash(0, &data));
            assert_eq!(c.block_hash(5, &data), c.block_hash(5, &data));
        }
    }

    #[test]
    fn xxh3_checksums_are_those_of_existing_disks() {
        // Computed by the code before keyed checksums existed: unkeyed
        // disks formatted then must verify now.
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let c = Checksum::xxh3(0x0123_4567_89ab_cdef);
        assert_eq!(c.block_hash(5, &data), 0xa6f1_8464_5d40_a57b);
        assert_eq!(
            Checksum::xxh3(0).block_hash(0, &data[..512]),
            0xf582_02b8_d901_9d1d
        );
    }

    #[test]
    fn keyed_checksums_keep_their_values() {
        // Pinned: keyed disks formatted now must verify in later builds.
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let c = Checksum::keyed(
            0x0123_4567_89ab_cdef,
            &Key::from_bytes(&[0x42; 32]).unwrap(),
        );
        assert_eq!(c.block_hash(5, &data), 0xa2d2_0f62_bd6b_e03f);
        assert_eq!(c.block_hash(0, &data[..512]), 0x7ead_79a6_dcc9_d9ee);
    }

    #[test]
    fn keyed_checksum_depends_on_the_key_and_differs_from_xxh3() {
        let data = [7u8; 4096];
        let [plain, keyed] = both();
        let other = Checksum::keyed(1, &Key::from_bytes(&[0x43; 32]).unwrap());
        assert_ne!(keyed.block_hash(3, &data), other.block_hash(3, &data));
        assert_ne!(keyed.block_hash(3, &data), plain.block_hash(3, &data));
        assert_eq!(
            (plain.hash_id(), keyed.hash_id()),
            (HASH_XXH3, HASH_BLAKE3_KEYED)
        );
    }

    #[test]
    fn zero_slot_verifies_only_zero_blocks() {
        let zeros = [0u8; 512];
        let mut one = [0u8; 512];
        one[511] = 1;
        for c in both() {
            assert!(c.matches(3, &zeros, ZERO));
            assert!(!c.matches(3, &one, ZERO));
            // A real checksum of the zero block is never the reserved value.
            assert_ne!(c.block_hash(3, &zeros), ZERO);
        }
        assert!(is_zero(&zeros[1..]));
        assert!(!is_zero(&one[3..]));
    }

    #[test]
    fn verify_prefers_new_then_old() {
        let a = [1u8; 512];
        let b = [2u8; 512];
        for c in both() {
            let (ha, hb) = (c.block_hash(0, &a), c.block_hash(0, &b));
            assert_eq!(c.verify(0, &a, ha, hb), Verdict::New);
            assert_eq!(c.verify(0, &b, ha, hb), Verdict::Old);
            assert_eq!(c.verify(0, &[3u8; 512], ha, hb), Verdict::Neither);
        }
    }

    #[test]
    fn debug_shows_the_algorithm_but_not_the_key() {
        let [_, keyed] = both();
        let shown = format!("{keyed:?}");
        assert!(shown.contains("blake3-keyed"), "{shown}");
        let key = Key::from_bytes(&[0x42; 32]).unwrap();
        let hex: String = key.block_key()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!shown.contains(&hex), "{shown}");
        // No byte array, in any notation.
        assert!(!shown.contains('['), "{shown}");
    }
}
