//! The 512-byte superblock at offset 0 of the metadata device.
//!
//! On-disk layout (all integers little endian; the rest of the sector is
//! zero and covered by the checksum):
//!
//! | offset | size | field                                        |
//! |-------:|-----:|----------------------------------------------|
//! |      0 |    8 | magic `b"TWINSUM\0"`                         |
//! |      8 |    4 | version                                      |
//! |     12 |    4 | block size (512 or 4096)                     |
//! |     16 |    8 | block count                                  |
//! |     24 |    4 | hash id                                      |
//! |     28 |    4 | flags (bit 0 clean, bit 1 synchronous mode)  |
//! |     32 |    8 | salt                                         |
//! |     40 |    8 | data size in bytes                           |
//! |     48 |    8 | generation                                   |
//! |     56 |    8 | xxh3-64 of the sector with this field zeroed |
//! |     64 |   32 | keyed disks: MAC of the sector, see below    |
//! |     96 |    8 | v2: byte offset of the metadata log          |
//! |    104 |    8 | v2: log size in bytes                        |
//! |    112 |    8 | v2: sequence number of the first log record  |
//! |        |      |     to replay (the checkpoint)               |
//! |    120 |    8 | v2: its byte position within the log         |
//!
//! Version 1 has no log: every commit writes pair-table pages. Version 2
//! puts a log after the table (FORMAT.md has its records); version 1
//! metadata opens and is served exactly as before.
//!
//! A disk with keyed checksums (hash id 2) carries at offset 64 the BLAKE3
//! keyed hash, under the key's superblock subkey, of the sector with bytes
//! 56..96 zeroed: so no field (hash id, salt, geometry, flags, generation)
//! changes unnoticed by a holder of the key. The xxh3 checksum covers the
//! MAC too, so damage is told apart from a wrong key. An unkeyed disk has
//! zeros there, byte for byte the format of before keyed checksums.

use std::ops::Range;

use xxhash_rust::xxh3::xxh3_64;

use crate::key::Key;

/// Size of the superblock on disk.
pub const SUPERBLOCK_SIZE: usize = 512;
/// The format version this build writes (it reads 1, 2 and 3).
pub const VERSION: u32 = 3;
/// The first version with a metadata log; its records carry pairs only.
pub const VERSION_LOG: u32 = 2;
/// The first version, without a metadata log.
pub const VERSION_NO_LOG: u32 = 1;
/// Smallest metadata log.
pub const MIN_LOG_SIZE: u64 = 16 << 10;
/// Hash id of xxh3-64 seeded by salt and block number.
pub const HASH_XXH3: u32 = 1;
/// Hash id of BLAKE3 keyed over data, block number and salt (in that order), 64 bits.
pub const HASH_BLAKE3_KEYED: u32 = 2;

/// The name of a hash id, as `info` prints it.
pub fn hash_name(id: u32) -> &'static str {
    match id {
        HASH_XXH3 => "xxh3-64",
        HASH_BLAKE3_KEYED => "blake3-keyed",
        _ => "unknown",
    }
}

/// Identifies twinsum metadata.
pub const MAGIC: [u8; 8] = *b"TWINSUM\0";

const FLAG_CLEAN: u32 = 1 << 0;
const FLAG_SYNC_MODE: u32 = 1 << 1;
const KNOWN_FLAGS: u32 = FLAG_CLEAN | FLAG_SYNC_MODE;

/// Field positions of the on-disk view. Kept in one place so that encode,
/// decode and the golden-bytes test cannot disagree.
mod off {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const BLOCK_SIZE: Range<usize> = 12..16;
    pub const BLOCKS: Range<usize> = 16..24;
    pub const HASH_ID: Range<usize> = 24..28;
    pub const FLAGS: Range<usize> = 28..32;
    pub const SALT: Range<usize> = 32..40;
    pub const DATA_SIZE: Range<usize> = 40..48;
    pub const GENERATION: Range<usize> = 48..56;
    pub const CHECKSUM: Range<usize> = 56..64;
    pub const MAC: Range<usize> = 64..96;
    pub const LOG_OFFSET: Range<usize> = 96..104;
    pub const LOG_SIZE: Range<usize> = 104..112;
    pub const LOG_SEQ: Range<usize> = 112..120;
    pub const LOG_POS: Range<usize> = 120..128;
}

/// Decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    /// 512 or 4096; the logical block size the guest sees.
    pub block_size: u32,
    pub blocks: u64,
    pub hash_id: u32,
    pub salt: u64,
    /// Size of the data image in bytes (`blocks * block_size`).
    pub data_size: u64,
    /// Shut down in order: every pair on disk is current.
    pub clean: bool,
    /// The backend was in synchronous mode when it last wrote this.
    pub sync_mode: bool,
    /// Bumped on every superblock write.
    pub generation: u64,
    /// Version 2: where the metadata log is, and where replay starts. All
    /// zero in version 1.
    pub log_offset: u64,
    pub log_size: u64,
    pub log_seq: u64,
    pub log_pos: u64,
}

/// Why a superblock was refused. Decode checks in the order of the
/// variants, so a given corruption always reports the same reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("superblock is short: {0} bytes, need {SUPERBLOCK_SIZE}")]
    Short(usize),
    #[error("not twinsum metadata (magic {0:#018x})")]
    Magic(u64),
    #[error("superblock checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum { stored: u64, computed: u64 },
    #[error("unsupported metadata version {0} (this build reads versions {VERSION_NO_LOG} to {VERSION})")]
    Version(u32),
    #[error("unknown superblock flags {0:#x}")]
    Flags(u32),
    #[error("unsupported block size {0} (512 or 4096)")]
    BlockSize(u32),
    #[error("unknown hash id {0}")]
    HashId(u32),
    #[error("data size {data_size} is not {blocks} blocks of {block_size} bytes")]
    DataSize {
        data_size: u64,
        blocks: u64,
        block_size: u32,
    },
    #[error(
        "the superblock says unkeyed checksums (xxh3-64) but carries a MAC: \
         its hash id was changed"
    )]
    StrayMac,
    #[error(
        "the disk has unkeyed checksums (xxh3-64) but a key was given: refusing to \
         ignore it (if the disk was formatted with a key, its superblock was changed)"
    )]
    UnexpectedKey,
    #[error("the disk has keyed checksums (blake3-keyed): give its key (--key-file)")]
    KeyRequired,
    #[error("superblock MAC mismatch: wrong key, or the superblock was changed")]
    BadMac,
    #[error(
        "bad metadata log geometry: offset {offset}, size {size}, replay from {pos} \
         (the log must follow the pair table at {table_end}, be at least {MIN_LOG_SIZE} bytes \
         in whole 4096-byte pages, and replay must start inside it on a 512-byte boundary)"
    )]
    Log {
        offset: u64,
        size: u64,
        pos: u64,
        table_end: u64,
    },
}

impl Superblock {
    /// A fresh version 1 superblock (no log; unclean, generation 0) for an
    /// image of `data_size` bytes cut into blocks of `block_size` bytes.
    /// [`Superblock::with_log`] makes it version 2.
    pub fn new(block_size: u32, data_size: u64, salt: u64) -> Result<Self, SuperblockError> {
        check_block_size(block_size)?;
        let blocks = data_size / u64::from(block_size);
        if !data_size.is_multiple_of(u64::from(block_size)) {
            return Err(SuperblockError::DataSize {
                data_size,
                blocks,
                block_size,
            });
        }
        Ok(Self {
            version: VERSION_NO_LOG,
            block_size,
            blocks,
            hash_id: HASH_XXH3,
            salt,
            data_size,
            clean: false,
            sync_mode: false,
            generation: 0,
            log_offset: 0,
            log_size: 0,
            log_seq: 0,
            log_pos: 0,
        })
    }

    /// A version 2 superblock with a metadata log of `log_size` bytes
    /// right after the pair table.
    pub fn with_log(mut self, log_size: u64) -> Self {
        self.version = VERSION;
        self.log_offset = super::meta_len(self.blocks);
        self.log_size = log_size;
        self.log_seq = 1;
        self.log_pos = 0;
        self
    }

    /// A version 1 superblock: no log.
    pub fn without_log(mut self) -> Self {
        self.version = VERSION_NO_LOG;
        self.log_offset = 0;
        self.log_size = 0;
        self.log_seq = 0;
        self.log_pos = 0;
        self
    }

    /// Whether this metadata has a log (version 2 and later).
    pub fn has_log(&self) -> bool {
        self.version >= VERSION_LOG
    }

    /// Whether its log records may carry versions beyond a block's pair
    /// (version 3): replay then gives a block every checksum of the last
    /// record naming it.
    pub fn log_versions(&self) -> bool {
        self.version >= 3
    }

    /// Bytes the metadata device needs: superblock, table and log.
    pub fn meta_len(&self) -> u64 {
        super::meta_len(self.blocks) + self.log_size
    }

    /// The sector of an unkeyed superblock as written to disk, checksum
    /// included.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        self.encode_with(None)
    }

    /// The sector as written to disk; a keyed superblock gets its MAC
    /// under `key` (without one it would not open again).
    pub fn encode_with(&self, key: Option<&Key>) -> [u8; SUPERBLOCK_SIZE] {
        let mut buf = [0u8; SUPERBLOCK_SIZE];
        let mut flags = 0;
        if self.clean {
            flags |= FLAG_CLEAN;
        }
        if self.sync_mode {
            flags |= FLAG_SYNC_MODE;
        }
        buf[off::MAGIC].copy_from_slice(&MAGIC);
        buf[off::VERSION].copy_from_slice(&self.version.to_le_bytes());
        buf[off::BLOCK_SIZE].copy_from_slice(&self.block_size.to_le_bytes());
        buf[off::BLOCKS].copy_from_slice(&self.blocks.to_le_bytes());
        buf[off::HASH_ID].copy_from_slice(&self.hash_id.to_le_bytes());
        buf[off::FLAGS].copy_from_slice(&flags.to_le_bytes());
        buf[off::SALT].copy_from_slice(&self.salt.to_le_bytes());
        buf[off::DATA_SIZE].copy_from_slice(&self.data_size.to_le_bytes());
        buf[off::GENERATION].copy_from_slice(&self.generation.to_le_bytes());
        if self.has_log() {
            buf[off::LOG_OFFSET].copy_from_slice(&self.log_offset.to_le_bytes());
            buf[off::LOG_SIZE].copy_from_slice(&self.log_size.to_le_bytes());
            buf[off::LOG_SEQ].copy_from_slice(&self.log_seq.to_le_bytes());
            buf[off::LOG_POS].copy_from_slice(&self.log_pos.to_le_bytes());
        }
        if let (HASH_BLAKE3_KEYED, Some(key)) = (self.hash_id, key) {
            let mac = mac_of(&buf, key);
            buf[off::MAC].copy_from_slice(mac.as_bytes());
        }
        // The checksum field is still zero here, as the checksum requires.
        let sum = xxh3_64(&buf);
        buf[off::CHECKSUM].copy_from_slice(&sum.to_le_bytes());
        buf
    }

    /// Parse and validate the sector of an unkeyed disk.
    pub fn decode(sector: &[u8]) -> Result<Self, SuperblockError> {
        Self::decode_with(sector, None)
    }

    /// Parse and validate a sector read from disk, for a caller holding
    /// `key` (or none). Refused besides what [`decode_unverified`] refuses:
    /// a keyed superblock without a key or with a MAC that does not match
    /// it, and an unkeyed one with a key or with a MAC.
    ///
    /// [`decode_unverified`]: Self::decode_unverified
    pub fn decode_with(sector: &[u8], key: Option<&Key>) -> Result<Self, SuperblockError> {
        let sb = Self::decode_unverified(sector)?;
        let mac = field::<32>(sector, off::MAC);
        match (sb.hash_id, key) {
            (HASH_XXH3, _) if mac != [0u8; 32] => Err(SuperblockError::StrayMac),
            (HASH_XXH3, Some(_)) => Err(SuperblockError::UnexpectedKey),
            (HASH_BLAKE3_KEYED, None) => Err(SuperblockError::KeyRequired),
            // blake3::Hash compares in constant time.
            (HASH_BLAKE3_KEYED, Some(k)) if blake3::Hash::from(mac) != mac_of(sector, k) => {
                Err(SuperblockError::BadMac)
            }
            _ => Ok(sb),
        }
    }

    /// Parse and validate a sector without checking a keyed superblock's
    /// MAC: only to show what it says (`info`) or to recognise metadata.
    pub fn decode_unverified(sector: &[u8]) -> Result<Self, SuperblockError> {
        let buf = sector
            .get(..SUPERBLOCK_SIZE)
            .ok_or(SuperblockError::Short(sector.len()))?;
        let magic = u64_be(buf, off::MAGIC);
        if magic != u64::from_be_bytes(MAGIC) {
            return Err(SuperblockError::Magic(magic));
        }
        let stored = u64_le(buf, off::CHECKSUM);
        let computed = checksum_of(buf);
        if stored != computed {
            return Err(SuperblockError::Checksum { stored, computed });
        }
        let version = u32_le(buf, off::VERSION);
        // Version 0 was never written; anything newer may change the layout.
        if version == 0 || version > VERSION {
            return Err(SuperblockError::Version(version));
        }
        let flags = u32_le(buf, off::FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(SuperblockError::Flags(flags));
        }
        let block_size = u32_le(buf, off::BLOCK_SIZE);
        check_block_size(block_size)?;
        let hash_id = u32_le(buf, off::HASH_ID);
        if hash_id != HASH_XXH3 && hash_id != HASH_BLAKE3_KEYED {
            return Err(SuperblockError::HashId(hash_id));
        }
        let blocks = u64_le(buf, off::BLOCKS);
        let data_size = u64_le(buf, off::DATA_SIZE);
        if blocks.checked_mul(u64::from(block_size)) != Some(data_size) {
            return Err(SuperblockError::DataSize {
                data_size,
                blocks,
                block_size,
            });
        }
        let mut sb = Self {
            version,
            block_size,
            blocks,
            hash_id,
            salt: u64_le(buf, off::SALT),
            data_size,
            clean: flags & FLAG_CLEAN != 0,
            sync_mode: flags & FLAG_SYNC_MODE != 0,
            generation: u64_le(buf, off::GENERATION),
            log_offset: 0,
            log_size: 0,
            log_seq: 0,
            log_pos: 0,
        };
        if version >= VERSION_LOG {
            sb.log_offset = u64_le(buf, off::LOG_OFFSET);
            sb.log_size = u64_le(buf, off::LOG_SIZE);
            sb.log_seq = u64_le(buf, off::LOG_SEQ);
            sb.log_pos = u64_le(buf, off::LOG_POS);
            let table_end = super::meta_len(blocks);
            let bad = sb.log_offset != table_end
                || sb.log_size < MIN_LOG_SIZE
                || !sb.log_size.is_multiple_of(4096)
                || sb.log_pos >= sb.log_size
                || !sb.log_pos.is_multiple_of(512);
            if bad {
                return Err(SuperblockError::Log {
                    offset: sb.log_offset,
                    size: sb.log_size,
                    pos: sb.log_pos,
                    table_end,
                });
            }
        }
        Ok(sb)
    }

    /// Byte offset of block `block` on the data device.
    pub fn block_offset(&self, block: u64) -> u64 {
        block * u64::from(self.block_size)
    }
}

fn check_block_size(block_size: u32) -> Result<(), SuperblockError> {
    match block_size {
        512 | 4096 => Ok(()),
        other => Err(SuperblockError::BlockSize(other)),
    }
}

/// xxh3-64 of the sector with the checksum field read as zero.
fn checksum_of(buf: &[u8]) -> u64 {
    let mut copy = [0u8; SUPERBLOCK_SIZE];
    copy.copy_from_slice(&buf[..SUPERBLOCK_SIZE]);
    copy[off::CHECKSUM].fill(0);
    xxh3_64(&copy)
}

/// The MAC of a keyed superblock: the sector with the checksum and MAC
/// fields read as zero, under the key's superblock subkey.
fn mac_of(buf: &[u8], key: &Key) -> blake3::Hash {
    let mut copy = [0u8; SUPERBLOCK_SIZE];
    copy.copy_from_slice(&buf[..SUPERBLOCK_SIZE]);
    copy[off::CHECKSUM].fill(0);
    copy[off::MAC].fill(0);
    key.superblock_mac(&copy)
}

// The helpers below take field ranges from `off`, which lie inside a
// SUPERBLOCK_SIZE buffer, so the fallbacks are unreachable; they keep the
// decoder free of panics all the same.
fn field<const N: usize>(buf: &[u8], range: Range<usize>) -> [u8; N] {
    buf.get(range)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0u8; N])
}

fn u32_le(buf: &[u8], range: Range<usize>) -> u32 {
    u32::from_le_bytes(field(buf, range))
}

fn u64_le(buf: &[u8], range: Range<usize>) -> u64 {
    u64::from_le_bytes(field(buf, range))
}

fn u64_be(buf: &[u8], range: Range<usize>) -> u64 {
    u64::from_be_bytes(field(buf, range))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1 superblock (no log): the golden bytes of the first
    /// format, which must keep opening byte for byte.
    fn sample() -> Superblock {
        Superblock {
            version: VERSION_NO_LOG,
            block_size: 4096,
            blocks: 0x100,
            hash_id: HASH_XXH3,
            salt: 0x0123_4567_89ab_cdef,
            data_size: 0x100 * 4096,
            clean: true,
            sync_mode: false,
            generation: 7,
            log_offset: 0,
            log_size: 0,
            log_seq: 0,
            log_pos: 0,
        }
    }

    #[test]
    fn version_3_carries_the_log_geometry() {
        let sb = sample().with_log(64 << 10);
        let buf = sb.encode();
        assert_eq!(&buf[8..12], &[3, 0, 0, 0]);
        assert!(sb.log_versions());
        // Version 2 has the same layout; its records carry pairs only.
        let mut v2 = buf;
        v2[8] = 2;
        reseal(&mut v2);
        let old = Superblock::decode(&v2).unwrap();
        assert!(old.has_log() && !old.log_versions());
        // 256 blocks: a one-page table after the 4096-byte superblock area.
        assert_eq!(&buf[96..104], &8192u64.to_le_bytes());
        assert_eq!(&buf[104..112], &(64u64 << 10).to_le_bytes());
        assert_eq!(&buf[112..120], &1u64.to_le_bytes());
        assert_eq!(&buf[120..128], &0u64.to_le_bytes());
        assert_eq!(Superblock::decode(&buf), Ok(sb.clone()));
        assert_eq!(sb.meta_len(), 8192 + (64 << 10));
        // A log that does not follow the table is refused, with its values.
        let mut bad = buf;
        bad[96..104].copy_from_slice(&4096u64.to_le_bytes());
        reseal(&mut bad);
        assert!(matches!(
            Superblock::decode(&bad),
            Err(SuperblockError::Log {
                offset: 4096,
                table_end: 8192,
                ..
            })
        ));
        let mut bad = buf;
        bad[120..128].copy_from_slice(&100u64.to_le_bytes());
        reseal(&mut bad);
        assert!(matches!(
            Superblock::decode(&bad),
            Err(SuperblockError::Log { pos: 100, .. })
        ));
    }

    /// Re-seal a tampered sector so that the check after the checksum runs.
    fn reseal(buf: &mut [u8; SUPERBLOCK_SIZE]) {
        buf[off::CHECKSUM].fill(0);
        let sum = xxh3_64(buf);
        buf[off::CHECKSUM].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let mut sb = sample();
        sb.sync_mode = true;
        sb.clean = false;
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    }

    #[test]
    fn golden_bytes_put_each_field_at_its_offset() {
        let buf = sample().encode();
        assert_eq!(&buf[0..8], b"TWINSUM\0");
        assert_eq!(&buf[8..12], &[1, 0, 0, 0]);
        assert_eq!(&buf[12..16], &[0x00, 0x10, 0, 0]);
        assert_eq!(&buf[16..24], &[0x00, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&buf[24..28], &[1, 0, 0, 0]);
        assert_eq!(&buf[28..32], &[1, 0, 0, 0]);
        assert_eq!(
            &buf[32..40],
            &[0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01]
        );
        assert_eq!(&buf[40..48], &[0, 0, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(&buf[48..56], &[7, 0, 0, 0, 0, 0, 0, 0]);
        assert!(buf[64..].iter().all(|&b| b == 0));
        let mut zeroed = buf;
        zeroed[56..64].fill(0);
        assert_eq!(&buf[56..64], &xxh3_64(&zeroed).to_le_bytes());
    }

    #[test]
    fn corrupted_magic_byte_is_bad_magic() {
        let mut buf = sample().encode();
        buf[0] = b'X';
        assert_eq!(
            Superblock::decode(&buf),
            Err(SuperblockError::Magic(u64::from_be_bytes(*b"XWINSUM\0")))
        );
    }

    #[test]
    fn flipped_byte_in_salt_is_a_checksum_error() {
        let good = sample().encode();
        let mut buf = good;
        buf[35] ^= 0x40;
        let stored = u64::from_le_bytes(good[56..64].try_into().unwrap());
        let err = Superblock::decode(&buf).unwrap_err();
        assert_eq!(
            err,
            SuperblockError::Checksum {
                stored,
                computed: checksum_of(&buf)
            }
        );
    }

    #[test]
    fn flipped_byte_in_reserved_area_is_a_checksum_error() {
        let mut buf = sample().encode();
        buf[400] = 1;
        assert!(matches!(
            Superblock::decode(&buf),
            Err(SuperblockError::Checksum { .. })
        ));
    }

    #[test]
    fn version_from_the_future_is_refused() {
        let mut buf = sample().encode();
        buf[8] = 4;
        reseal(&mut buf);
        assert_eq!(Superblock::decode(&buf), Err(SuperblockError::Version(4)));
    }

    #[test]
    fn unknown_flag_bits_are_refused() {
        let mut buf = sample().encode();
        buf[28] = 0b101;
        reseal(&mut buf);
        assert_eq!(Superblock::decode(&buf), Err(SuperblockError::Flags(0b101)));
    }

    #[test]
    fn odd_block_size_is_refused() {
        let mut buf = sample().encode();
        buf[12..16].copy_from_slice(&1024u32.to_le_bytes());
        reseal(&mut buf);
        assert_eq!(
            Superblock::decode(&buf),
            Err(SuperblockError::BlockSize(1024))
        );
    }

    #[test]
    fn unknown_hash_id_is_refused() {
        let mut buf = sample().encode();
        buf[24] = 9;
        reseal(&mut buf);
        assert_eq!(Superblock::decode(&buf), Err(SuperblockError::HashId(9)));
    }

    #[test]
    fn data_size_must_be_blocks_times_block_size() {
        let mut buf = sample().encode();
        buf[40] = 1;
        reseal(&mut buf);
        assert_eq!(
            Superblock::decode(&buf),
            Err(SuperblockError::DataSize {
                data_size: 0x100 * 4096 + 1,
                blocks: 0x100,
                block_size: 4096
            })
        );
    }

    #[test]
    fn magic_is_checked_before_checksum() {
        // A sector of zeros (a hole) fails on the magic, not the checksum.
        assert_eq!(
            Superblock::decode(&[0u8; SUPERBLOCK_SIZE]),
            Err(SuperblockError::Magic(0))
        );
    }

    #[test]
    fn short_buffer_is_refused() {
        assert_eq!(
            Superblock::decode(&[0u8; 100]),
            Err(SuperblockError::Short(100))
        );
    }

    #[test]
    fn new_counts_blocks_and_rejects_partial_blocks() {
        let sb = Superblock::new(512, 512 * 10, 3).unwrap();
        assert_eq!((sb.blocks, sb.salt, sb.clean), (10, 3, false));
        assert!(matches!(
            Superblock::new(4096, 4097, 0),
            Err(SuperblockError::DataSize { .. })
        ));
        assert_eq!(
            Superblock::new(2048, 4096, 0),
            Err(SuperblockError::BlockSize(2048))
        );
    }

    fn key(byte: u8) -> Key {
        Key::from_bytes(&[byte; 32]).unwrap()
    }

    fn keyed_sample() -> Superblock {
        Superblock {
            hash_id: HASH_BLAKE3_KEYED,
            ..sample()
        }
    }

    #[test]
    fn keyed_round_trip_needs_the_key() {
        let sb = keyed_sample();
        let buf = sb.encode_with(Some(&key(1)));
        assert_eq!(Superblock::decode_with(&buf, Some(&key(1))), Ok(sb.clone()));
        assert_eq!(Superblock::decode(&buf), Err(SuperblockError::KeyRequired));
        assert_eq!(
            Superblock::decode_with(&buf, Some(&key(2))),
            Err(SuperblockError::BadMac)
        );
        // Only to look at it.
        assert_eq!(Superblock::decode_unverified(&buf), Ok(sb));
    }

    #[test]
    fn keyed_golden_bytes_put_the_mac_at_64() {
        let buf = keyed_sample().encode_with(Some(&key(1)));
        assert_eq!(&buf[24..28], &[2, 0, 0, 0]);
        let mut zeroed = buf;
        zeroed[56..96].fill(0);
        let mac = key(1).superblock_mac(&zeroed);
        assert_eq!(&buf[64..96], mac.as_bytes());
        // Pinned, key derivation included: keyed disks formatted now must
        // open in later builds.
        assert_eq!(&buf[64..72], &[57, 127, 94, 88, 26, 188, 121, 145]);
        assert!(buf[96..].iter().all(|&b| b == 0));
        let mut sealed = buf;
        sealed[56..64].fill(0);
        assert_eq!(&buf[56..64], &xxh3_64(&sealed).to_le_bytes());
    }

    #[test]
    fn a_field_changed_and_resealed_breaks_the_mac() {
        let good = keyed_sample().encode_with(Some(&key(1)));
        // Salt, flags (sync mode), generation, block count with data size,
        // and a byte of the reserved area.
        type Edit = fn(&mut [u8; SUPERBLOCK_SIZE]);
        let edits: [Edit; 5] = [
            |b| b[33] ^= 1,
            |b| b[28] ^= 2,
            |b| b[48] ^= 1,
            |b| {
                b[16] = 0x80;
                b[40..48].copy_from_slice(&(0x180u64 * 4096).to_le_bytes());
            },
            |b| b[300] = 9,
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut buf = good;
            edit(&mut buf);
            reseal(&mut buf);
            assert!(Superblock::decode_unverified(&buf).is_ok(), "edit {i}");
            assert_eq!(
                Superblock::decode_with(&buf, Some(&key(1))),
                Err(SuperblockError::BadMac),
                "edit {i}"
            );
        }
    }

    #[test]
    fn hash_id_flipped_to_unkeyed_is_caught() {
        let good = keyed_sample().encode_with(Some(&key(1)));
        let mut flipped = good;
        flipped[24] = HASH_XXH3 as u8;
        reseal(&mut flipped);
        // The MAC left in place gives it away even without the key.
        assert_eq!(Superblock::decode(&flipped), Err(SuperblockError::StrayMac));
        assert_eq!(
            Superblock::decode_with(&flipped, Some(&key(1))),
            Err(SuperblockError::StrayMac)
        );
        // With the MAC wiped too, only the key's holder can tell: the disk
        // now looks unkeyed, and an unkeyed disk refuses a key.
        flipped[64..96].fill(0);
        reseal(&mut flipped);
        assert!(Superblock::decode(&flipped).is_ok());
        assert_eq!(
            Superblock::decode_with(&flipped, Some(&key(1))),
            Err(SuperblockError::UnexpectedKey)
        );
    }

    #[test]
    fn unkeyed_superblock_refuses_a_key() {
        let buf = sample().encode();
        assert_eq!(
            Superblock::decode_with(&buf, Some(&key(1))),
            Err(SuperblockError::UnexpectedKey)
        );
        // A key given to encode changes nothing for an unkeyed superblock.
        assert_eq!(sample().encode_with(Some(&key(1))), buf);
    }
}
