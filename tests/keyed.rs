//! Keyed checksums through the built binary: `format`, `check`, `info` and
//! `serve` with `--key-file`, the refusals (no key, wrong key, a key for
//! an unkeyed disk, a bad key file), and the attacks a key is for: a block
//! rewritten with its pair recomputed the unkeyed way, and a superblock
//! downgraded to unkeyed.

mod common {
    pub mod client;
    pub mod content;
    pub mod disk;
    pub mod run;
}

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::client::Client;
use common::content::pattern;
use common::disk::{twinsum, Daemon, Disk};
use common::run::s;
use twinsum::integrity::hash::Checksum;
use twinsum::meta::{Superblock, PAIR_SIZE, SUPERBLOCK_SIZE, TABLE_OFFSET};
use xxhash_rust::xxh3::xxh3_64;

const BS: u64 = 4096;
const SIZE: u64 = 1 << 20;

/// A key file of `bytes` bytes made from `seed`, with mode `mode`.
fn key_file(dir: &Path, name: &str, seed: u8, bytes: usize, mode: u32) -> PathBuf {
    let p = dir.join(name);
    let material: Vec<u8> = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect();
    fs::write(&p, material).expect("write key");
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod key");
    p
}

/// A formatted keyed disk (some blocks written first) and its key file.
fn keyed_disk() -> (Disk, PathBuf) {
    let mut key = None;
    let disk = Disk::new_with(SIZE, BS, |dir| {
        let k = key_file(dir, "key", 3, 32, 0o600);
        // Data before the format, so that format hashes some blocks.
        let img = dir.join("disk.img");
        fs::write(&img, vec![0u8; SIZE as usize]).expect("image");
        let f = fs::OpenOptions::new().write(true).open(&img).expect("open");
        for b in 0..8u64 {
            f.write_all_at(&[b as u8 + 1; BS as usize], b * BS)
                .expect("write");
        }
        key = Some(k.clone());
        vec!["--key-file".into(), s(&k).into()]
    });
    (disk, key.expect("key made"))
}

fn check(disk: &Disk, key: Option<&Path>) -> Output {
    match key {
        Some(k) => disk.check(&["--json", "--key-file", s(k)]),
        None => disk.check(&["--json"]),
    }
}

fn exit_code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// Exit 2 with exactly one line on stderr, containing `needle`.
fn assert_refused(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(exit_code(o), 2, "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
}

fn mismatches(o: &Output) -> Vec<u64> {
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check --json");
    j["mismatches"]
        .as_array()
        .expect("mismatches list")
        .iter()
        .map(|v| v.as_u64().expect("block number"))
        .collect()
}

fn superblock_sector(disk: &Disk) -> [u8; SUPERBLOCK_SIZE] {
    let mut sector = [0u8; SUPERBLOCK_SIZE];
    let f = fs::File::open(&disk.meta).expect("open meta");
    f.read_exact_at(&mut sector, 0).expect("read superblock");
    sector
}

/// Write `sector` back with a valid xxh3 self-checksum, as anyone who can
/// write the metadata can.
fn write_resealed(disk: &Disk, mut sector: [u8; SUPERBLOCK_SIZE]) {
    sector[56..64].fill(0);
    let sum = xxh3_64(&sector);
    sector[56..64].copy_from_slice(&sum.to_le_bytes());
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&disk.meta)
        .expect("open meta");
    f.write_all_at(&sector, 0).expect("write superblock");
}

/// Replace block `b` and store a pair for it computed as an unkeyed disk's
/// would be, with the salt read from the superblock: what someone who can
/// write both files but holds no key can do.
fn forge_block(disk: &Disk, b: u64) {
    let forged = vec![0xa5u8; BS as usize];
    let salt = Superblock::decode_unverified(&superblock_sector(disk))
        .expect("superblock")
        .salt;
    let h = Checksum::xxh3(salt).block_hash(b, &forged);
    let data = fs::OpenOptions::new().write(true).open(&disk.data).unwrap();
    data.write_all_at(&forged, b * BS).unwrap();
    let mut pair = [0u8; PAIR_SIZE as usize];
    pair[..8].copy_from_slice(&h.to_le_bytes());
    pair[8..].copy_from_slice(&h.to_le_bytes());
    let meta = fs::OpenOptions::new().write(true).open(&disk.meta).unwrap();
    meta.write_all_at(&pair, TABLE_OFFSET + b * PAIR_SIZE)
        .unwrap();
}

#[test]
fn keyed_disk_checks_clean_with_its_key_and_says_so_in_info() {
    let (disk, key) = keyed_disk();
    let o = check(&disk, Some(&key));
    assert_eq!(exit_code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(mismatches(&o).is_empty());
    let j = disk.info();
    assert_eq!(j["hash"], "blake3-keyed");
    let text = twinsum(&["info", "--meta", s(&disk.meta)]);
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(
        out.contains("blake3-keyed (superblock MAC not checked"),
        "{out}"
    );
    // An unkeyed disk says what it always said.
    assert_eq!(Disk::new(SIZE, BS).info()["hash"], "xxh3-64");
}

#[test]
fn keyed_disk_refuses_no_key_and_a_wrong_key() {
    let (disk, _) = keyed_disk();
    assert_refused(&check(&disk, None), "--key-file");
    let wrong = key_file(disk.dir.path(), "wrong", 4, 32, 0o600);
    assert_refused(&check(&disk, Some(&wrong)), "superblock MAC mismatch");
}

#[test]
fn unkeyed_disk_refuses_a_key() {
    let disk = Disk::new(SIZE, BS);
    let key = key_file(disk.dir.path(), "key", 3, 32, 0o600);
    assert_refused(
        &check(&disk, Some(&key)),
        "unkeyed checksums (xxh3-64) but a key",
    );
}

#[test]
fn short_and_group_readable_key_files_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let meta = dir.path().join("disk.meta");
    let format = |key: &Path| {
        twinsum(&[
            "format",
            "--data",
            s(&img),
            "--meta",
            s(&meta),
            "--size",
            "1M",
            "--key-file",
            s(key),
        ])
    };
    let short = key_file(dir.path(), "short", 3, 31, 0o600);
    assert_refused(&format(&short), "holds 31 bytes");
    for (name, mode) in [("group", 0o640), ("other", 0o604)] {
        let open = key_file(dir.path(), name, 3, 32, mode);
        assert_refused(&format(&open), "chmod 600");
    }
    assert!(
        !img.exists() && !meta.exists(),
        "a refused format wrote files"
    );
    let missing = dir.path().join("missing");
    assert_refused(&format(&missing), "cannot read key file");
    // The same key file, made private, is accepted.
    let ok = key_file(dir.path(), "other", 3, 32, 0o600);
    assert_eq!(exit_code(&format(&ok)), 0);
}

#[test]
fn block_rewritten_with_an_unkeyed_pair_is_caught() {
    let (disk, key) = keyed_disk();
    forge_block(&disk, 3);
    let o = check(&disk, Some(&key));
    assert_eq!(exit_code(&o), 1, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mismatches(&o), [3]);
    // The same forgery on an unkeyed disk passes: that is what a key is for.
    let plain = Disk::new(SIZE, BS);
    forge_block(&plain, 3);
    let o = check(&plain, None);
    assert_eq!(exit_code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn superblock_downgraded_to_unkeyed_is_caught() {
    let (disk, key) = keyed_disk();
    let good = superblock_sector(&disk);
    // Hash id flipped to xxh3, MAC left in place: caught even without key.
    let mut flipped = good;
    flipped[24..28].copy_from_slice(&1u32.to_le_bytes());
    write_resealed(&disk, flipped);
    assert_refused(&check(&disk, None), "carries a MAC");
    assert_refused(&check(&disk, Some(&key)), "carries a MAC");
    // MAC wiped too: only the key's holder can tell, and is refused.
    flipped[64..96].fill(0);
    write_resealed(&disk, flipped);
    assert_refused(
        &check(&disk, Some(&key)),
        "unkeyed checksums (xxh3-64) but a key",
    );
    // The salt changed instead: the MAC no longer matches.
    let mut salted = good;
    salted[32] ^= 1;
    write_resealed(&disk, salted);
    assert_refused(&check(&disk, Some(&key)), "superblock MAC mismatch");
    // Put back, the disk is fine again.
    write_resealed(&disk, good);
    assert_eq!(exit_code(&check(&disk, Some(&key))), 0);
}

#[test]
fn serve_needs_the_key_of_a_keyed_disk_and_serves_with_it() {
    let (disk, key) = keyed_disk();
    let wrong = key_file(disk.dir.path(), "wrong", 4, 32, 0o600);
    for (args, needle) in [
        (vec![], "--key-file"),
        (vec!["--key-file", s(&wrong)], "superblock MAC mismatch"),
    ] {
        let mut d = Daemon::spawn(&disk, &disk.socket, &args);
        let st = d.wait_exit();
        assert_eq!(st.code(), Some(2), "{}", d.log());
        let log = d.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(!disk.socket.exists(), "a refused serve left its socket");
    }
    let d = disk.serve(&["--key-file", s(&key)]);
    {
        let mut c = Client::connect(&d.socket, 1);
        let mut q = c.q0();
        assert_eq!(q.read(0, BS as usize).unwrap(), vec![1u8; BS as usize]);
        let v = pattern(BS, 2 * BS as usize, 9);
        q.write(BS, &v).unwrap();
        q.flush().unwrap();
        assert_eq!(q.read(BS, 2 * BS as usize).unwrap(), v);
    }
    assert!(d.terminate().success());
    let o = check(&disk, Some(&key));
    assert_eq!(exit_code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
}
