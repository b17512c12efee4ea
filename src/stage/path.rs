//! Where a stage lives by default, and which boot of the host this is.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::BootId;

/// The stage of `meta` unless the operator names one: in
/// `$XDG_RUNTIME_DIR` when set, else `/dev/shm` (both tmpfs: memory that
/// outlives the process but not the host), named after the metadata's file
/// name and a hash of its canonical path, so two disks never share one.
pub fn default_path(meta: &Path) -> io::Result<PathBuf> {
    let canonical = fs::canonicalize(meta)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {}: {e}", meta.display())))?;
    let hash = xxhash_rust::xxh3::xxh3_64(canonical.as_os_str().as_encoded_bytes());
    let name: String = canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_dir() => PathBuf::from(d),
        _ => PathBuf::from("/dev/shm"),
    };
    Ok(dir.join(format!("twinsum-{name}-{hash:016x}.stage")))
}

/// This boot of the host, from the kernel's random boot id.
pub fn boot_id() -> io::Result<BootId> {
    let text = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let hex: String = text.chars().filter(char::is_ascii_hexdigit).collect();
    let mut id = [0u8; 16];
    if hex.len() != 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected boot id {text:?}"),
        ));
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    Ok(id)
}
