//! A fresh file system of its own for one server of the scale curve.
//!
//! On a sparse disk a server's writes allocate blocks in the host's file
//! system, so what one server left there (fragmented free space, ext4's
//! preallocations) changes what the next one measures: on a shared file
//! system the 1 TiB flush row gave the side that ran second a third of the
//! rate it had alone. Each side gets an identical, new ext4 on a loop
//! device over a fully allocated file instead. It needs root and `mkfs.ext4`,
//! `losetup` and `mount`; without them the caller falls back to one
//! shared directory and says so.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Size of each scratch file system: room for a 1 TiB run's writes and
/// twinsum's metadata pages (about 5 GiB). Its backing file is allocated
/// in full, so the host file system allocates nothing during the runs
/// (that would bring back the shared state this avoids).
const SIZE: u64 = 16 << 30;

/// A mounted scratch file system; unmounted and removed on drop.
pub struct ScratchFs {
    pub mnt: PathBuf,
    backing: PathBuf,
    dev: Option<String>,
    mounted: bool,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl ScratchFs {
    /// Make and mount a fresh ext4 (no journal, as the hosts these benches
    /// run on) named `name` under `dir`.
    pub fn make(dir: &Path, name: &str) -> Result<Self> {
        let mut fs = ScratchFs {
            mnt: dir.join(format!("{name}-fs")),
            backing: dir.join(format!("{name}.ext4")),
            dev: None,
            mounted: false,
        };
        run(Command::new("fallocate")
            .args(["-l", &SIZE.to_string()])
            .arg(&fs.backing))?;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E", "nodiscard"])
            .arg(&fs.backing))?;
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&fs.backing))?;
        fs.dev = Some(dev.clone());
        fs::create_dir_all(&fs.mnt)?;
        run(Command::new("mount")
            .args(["-t", "ext4", &dev])
            .arg(&fs.mnt))?;
        fs.mounted = true;
        Ok(fs)
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = run(Command::new("umount").arg(&self.mnt)) {
                eprintln!("bench: {e:#}");
            }
        }
        if let Some(dev) = &self.dev {
            if let Err(e) = run(Command::new("losetup").args(["-d", dev])) {
                eprintln!("bench: {e:#}");
            }
        }
        let _ = fs::remove_dir(&self.mnt);
        let _ = fs::remove_file(&self.backing);
    }
}
