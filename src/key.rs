//! The secret key of a disk with keyed checksums (`--key-file`).
//!
//! The file's bytes (32 or more, all of them used) are key material; two
//! subkeys are derived from it with BLAKE3's key derivation, one for the
//! per-block checksums and one for the superblock MAC, so that neither
//! output can stand in for the other. Neither the material nor the
//! subkeys are ever logged or shown by `Debug`.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Fewest bytes of key material a key file must hold.
pub const MIN_KEY_LEN: usize = 32;
/// Most bytes a key file may hold: anything longer is more likely an
/// image given by mistake than a key.
pub const MAX_KEY_LEN: usize = 4096;

// Fixed, distinct contexts (BLAKE3 `derive_key`): changing one changes
// every checksum of every keyed disk.
const BLOCK_CONTEXT: &str = "twinsum 2026-12 keyed block checksum v1";
const SUPERBLOCK_CONTEXT: &str = "twinsum 2026-12 superblock MAC v1";

/// The subkeys derived from one key file.
#[derive(Clone)]
pub struct Key {
    block: [u8; 32],
    superblock: [u8; 32],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<secret>)")
    }
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "key file {} holds {len} bytes; a key needs at least {MIN_KEY_LEN} \
         (make one with: head -c 32 /dev/urandom > FILE; chmod 600 FILE)",
        path.display()
    )]
    Short { path: PathBuf, len: usize },
    #[error("key file {} is longer than {MAX_KEY_LEN} bytes: not a key file", path.display())]
    Long { path: PathBuf },
    #[error(
        "key file {} is accessible by group or others (mode {mode:04o}); refusing it \
         as ssh refuses such a private key: chmod 600 {}",
        path.display(),
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
}

impl Key {
    /// The key for `material`, or `None` if it is shorter than
    /// [`MIN_KEY_LEN`].
    pub fn from_bytes(material: &[u8]) -> Option<Self> {
        (material.len() >= MIN_KEY_LEN).then(|| Self {
            block: blake3::derive_key(BLOCK_CONTEXT, material),
            superblock: blake3::derive_key(SUPERBLOCK_CONTEXT, material),
        })
    }

    /// Read a key file. Refused: a file that group or others may read or
    /// write (a key others can read protects nothing, one they can write
    /// they can replace), shorter than [`MIN_KEY_LEN`] or longer than
    /// [`MAX_KEY_LEN`] bytes.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        // The mode of the file we opened, not of whatever the path names
        // by the time we look.
        let mode = file.metadata().map_err(io_err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let mut material = Vec::with_capacity(MAX_KEY_LEN + 1);
        file.take(MAX_KEY_LEN as u64 + 1)
            .read_to_end(&mut material)
            .map_err(io_err)?;
        let key = match material.len() {
            n if n > MAX_KEY_LEN => Err(KeyError::Long {
                path: path.to_owned(),
            }),
            n => Self::from_bytes(&material).ok_or(KeyError::Short {
                path: path.to_owned(),
                len: n,
            }),
        };
        // Best effort: the material is not needed past this point.
        material.fill(0);
        std::hint::black_box(&material);
        key
    }

    /// The subkey of the per-block checksums.
    pub(crate) fn block_key(&self) -> &[u8; 32] {
        &self.block
    }

    /// The MAC of `bytes` (a superblock with its checksum fields zeroed).
    pub(crate) fn superblock_mac(&self, bytes: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.superblock, bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn key_file(dir: &Path, bytes: &[u8], mode: u32) -> PathBuf {
        let p = dir.join("key");
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_of_32_bytes_or_more_is_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = key_file(dir.path(), &[7u8; 32], 0o600);
        let k = Key::load(&p).unwrap();
        assert_eq!(k.block, Key::from_bytes(&[7u8; 32]).unwrap().block);
        let p = key_file(dir.path(), &[7u8; 100], 0o400);
        assert!(Key::load(&p).is_ok());
    }

    #[test]
    fn short_long_and_open_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = key_file(dir.path(), &[7u8; 31], 0o600);
        assert!(matches!(
            Key::load(&p),
            Err(KeyError::Short { len: 31, .. })
        ));
        let p = key_file(dir.path(), &[7u8; MAX_KEY_LEN + 1], 0o600);
        assert!(matches!(Key::load(&p), Err(KeyError::Long { .. })));
        for mode in [0o640, 0o604, 0o620, 0o644] {
            let p = key_file(dir.path(), &[7u8; 32], mode);
            match Key::load(&p) {
                Err(KeyError::TooOpen { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
        assert!(matches!(
            Key::load(&dir.path().join("missing")),
            Err(KeyError::Io { .. })
        ));
    }

    #[test]
    fn subkeys_differ_and_debug_shows_no_key() {
        let k = Key::from_bytes(&[1u8; 32]).unwrap();
        assert_ne!(k.block, k.superblock);
        assert_ne!(k.block, Key::from_bytes(&[2u8; 32]).unwrap().block);
        assert_eq!(format!("{k:?}"), "Key(<secret>)");
        assert!(Key::from_bytes(&[1u8; 31]).is_none());
    }
}
