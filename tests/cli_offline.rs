//! The offline commands (`format`, `check`, `info`) driven through the
//! built binary, as an operator or a script would (DESIGN §7).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Paths of one image and its metadata in a private directory.
struct Disk {
    dir: tempfile::TempDir,
    img: PathBuf,
    meta: PathBuf,
}

impl Disk {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            img: dir.path().join("disk.img"),
            meta: dir.path().join("disk.meta"),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write `blocks` blocks of varied content into a new IMG: non-zero
    /// blocks, all-zero blocks written as data, and a hole at the end.
    fn write_known_data(&self, block_size: u64, blocks: u64) {
        let f = File::create(&self.img).expect("create image");
        f.set_len(block_size * blocks).expect("size image");
        for b in 0..blocks * 3 / 4 {
            let content = block_content(b, block_size);
            f.write_all_at(&content, b * block_size).expect("write");
        }
    }

    fn format(&self, block_size: u64) -> Output {
        self.format_with(&["--block-size", &block_size.to_string()])
    }

    /// `format --size SIZE`, IMG created sparse if it does not exist.
    fn format_sized(&self, size: &str) -> Output {
        self.format_with(&["--size", size])
    }

    fn format_with(&self, extra: &[&str]) -> Output {
        let args = ["format", "--data", s(&self.img), "--meta", s(&self.meta)];
        twinsum(&[&args[..], extra].concat())
    }

    fn check(&self, json: bool) -> Output {
        let mut args = vec!["check", "--data", s(&self.img), "--meta", s(&self.meta)];
        if json {
            args.push("--json");
        }
        twinsum(&args)
    }
}

/// Every fifth block is zeros written as data; the rest carry a pattern
/// unique to the block.
fn block_content(block: u64, block_size: u64) -> Vec<u8> {
    if block % 5 == 4 {
        return vec![0; block_size as usize];
    }
    (0..block_size)
        .map(|i| (i as u8) ^ (block as u8).wrapping_mul(31) ^ 0x5a)
        .collect()
}

fn twinsum(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twinsum"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run twinsum")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", stdout(o)))
}

fn assert_exit(o: &Output, want: i32) {
    assert_eq!(
        code(o),
        want,
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x01;
    f.write_all_at(&b, offset).expect("write");
}

fn formatted_disk(block_size: u64, blocks: u64) -> Disk {
    let disk = Disk::new();
    disk.write_known_data(block_size, blocks);
    assert_exit(&disk.format(block_size), 0);
    disk
}

fn check_accepts_data_written_before_format(block_size: u64) {
    let disk = formatted_disk(block_size, 300);
    let text = disk.check(false);
    assert_exit(&text, 0);
    assert!(stdout(&text).contains("0 mismatched"), "{}", stdout(&text));
    let j = json(&disk.check(true));
    assert_eq!(j["blocks"], 300);
    assert_eq!(j["checked"], 300);
    assert_eq!(j["mismatches"], Value::Array(vec![]));
    assert_eq!(j["pending"], 0);
    assert_eq!(j["clean"], true);
}

#[test]
fn check_accepts_data_written_before_format_4096() {
    check_accepts_data_written_before_format(4096);
}

#[test]
fn check_accepts_data_written_before_format_512() {
    check_accepts_data_written_before_format(512);
}

fn check_names_the_block_with_a_flipped_byte(block_size: u64) {
    let disk = formatted_disk(block_size, 300);
    let bad = 123;
    flip_byte(&disk.img, bad * block_size + block_size / 2);
    let text = disk.check(false);
    assert_exit(&text, 1);
    let out = stdout(&text);
    let bad_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("block ")).collect();
    assert_eq!(bad_lines.len(), 1, "{out}");
    assert!(bad_lines[0].starts_with(&format!("block {bad}:")), "{out}");
    let listed = disk.check(true);
    assert_exit(&listed, 1);
    assert_eq!(json(&listed)["mismatches"], serde_json::json!([bad]));
}

#[test]
fn check_names_the_block_with_a_flipped_byte_4096() {
    check_names_the_block_with_a_flipped_byte(4096);
}

#[test]
fn check_names_the_block_with_a_flipped_byte_512() {
    check_names_the_block_with_a_flipped_byte(512);
}

#[test]
fn check_catches_a_byte_written_into_a_zero_block() {
    let disk = formatted_disk(4096, 64);
    // Block 4 was written as zeros, so its pair is the zero value.
    flip_byte(&disk.img, 4 * 4096);
    let o = disk.check(true);
    assert_exit(&o, 1);
    assert_eq!(json(&o)["mismatches"], serde_json::json!([4]));
}

#[test]
fn check_treats_a_hole_punched_over_data_as_a_mismatch() {
    let disk = formatted_disk(4096, 64);
    let f = OpenOptions::new()
        .write(true)
        .open(&disk.img)
        .expect("open");
    // SAFETY: fallocate on a descriptor we own, with in-range values.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            10 * 4096,
            4096,
        )
    };
    assert_eq!(rc, 0, "punch hole");
    let o = disk.check(true);
    assert_exit(&o, 1);
    assert_eq!(json(&o)["mismatches"], serde_json::json!([10]));
}

#[test]
fn check_refuses_metadata_of_another_image() {
    let disk = formatted_disk(4096, 64);
    let other = disk.path("other.img");
    File::create(&other)
        .and_then(|f| f.set_len(128 * 4096))
        .expect("other image");
    let o = twinsum(&["check", "--data", s(&other), "--meta", s(&disk.meta)]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("another image"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line reason: {err}");
}

#[test]
fn check_refuses_truncated_metadata() {
    let disk = formatted_disk(512, 2000);
    let len = fs::metadata(&disk.meta).expect("meta").len();
    File::options()
        .write(true)
        .open(&disk.meta)
        .and_then(|f| f.set_len(len - 4096))
        .expect("truncate");
    let o = disk.check(false);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
}

#[test]
fn check_refuses_garbage_metadata_naming_bad_magic() {
    let disk = formatted_disk(4096, 16);
    fs::write(&disk.meta, vec![0xa5u8; 64 * 1024]).expect("garbage");
    let o = disk.check(false);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("magic"), "{}", stderr(&o));
}

#[test]
fn check_refuses_a_corrupted_superblock() {
    let disk = formatted_disk(4096, 16);
    flip_byte(&disk.meta, 33); // inside the salt
    let o = disk.check(false);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("checksum"), "{}", stderr(&o));
}

#[test]
fn format_refuses_existing_metadata_without_force() {
    let disk = formatted_disk(4096, 16);
    let before = fs::read(&disk.meta).expect("meta");
    let o = disk.format(4096);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(
        fs::read(&disk.meta).expect("meta"),
        before,
        "left untouched"
    );

    let forced = twinsum(&[
        "format",
        "--data",
        s(&disk.img),
        "--meta",
        s(&disk.meta),
        "--force",
    ]);
    assert_exit(&forced, 0);
    assert_exit(&disk.check(false), 0);
}

#[test]
fn format_refuses_a_non_empty_file_as_metadata() {
    let disk = Disk::new();
    disk.write_known_data(4096, 8);
    fs::write(&disk.meta, b"precious").expect("write");
    let o = disk.format(4096);
    assert_exit(&o, 2);
    assert_eq!(fs::read(&disk.meta).expect("meta"), b"precious");
}

#[test]
fn format_with_size_creates_a_sparse_image() {
    let disk = Disk::new();
    let o = disk.format_sized("1G");
    assert_exit(&o, 0);
    let img = fs::metadata(&disk.img).expect("image");
    assert_eq!(img.len(), 1 << 30);
    assert!(img.blocks() * 512 < 1 << 20, "image is sparse");
    let meta = fs::metadata(&disk.meta).expect("meta");
    // Superblock, the pair table (4 MiB), then a metadata log four times
    // as large (the table's storage is reserved: see the next test).
    assert_eq!(meta.len(), 4096 + (1 << 30) / 4096 * 16 + (16 << 20));
    assert_exit(&disk.check(false), 0);

    // --meta-log 0: the first format, without a log, the table alone.
    fs::remove_file(&disk.meta).unwrap();
    let o = twinsum(&[
        "format",
        "--data",
        s(&disk.img),
        "--meta",
        s(&disk.meta),
        "--meta-log",
        "0",
    ]);
    assert_exit(&o, 0);
    assert_eq!(
        fs::metadata(&disk.meta).unwrap().len(),
        4096 + (1 << 30) / 4096 * 16
    );
    let o = twinsum(&["info", "--meta", s(&disk.meta), "--json"]);
    assert_eq!(json(&o)["version"], 1);
    assert_exit(&disk.check(false), 0);
}

#[test]
fn format_refuses_a_size_that_differs_from_the_image() {
    let disk = Disk::new();
    disk.write_known_data(4096, 8);
    let o = disk.format_sized("1M");
    assert_exit(&o, 2);
    assert!(!disk.meta.exists(), "nothing written");
}

#[test]
fn format_without_size_needs_an_existing_image() {
    let disk = Disk::new();
    assert_exit(&disk.format(4096), 2);
    assert!(!disk.img.exists());
}

#[test]
fn format_refuses_a_block_size_other_than_512_or_4096() {
    let disk = Disk::new();
    disk.write_known_data(4096, 8);
    assert_exit(&disk.format(1024), 2);
}

#[test]
fn format_refuses_an_image_that_is_not_whole_blocks() {
    let disk = Disk::new();
    File::create(&disk.img)
        .and_then(|f| f.set_len(4096 * 3 + 512))
        .expect("image");
    assert_exit(&disk.format(4096), 2);
    assert_exit(&disk.format(512), 0);
}

#[test]
fn info_json_has_the_documented_keys() {
    let disk = formatted_disk(512, 100);
    let o = twinsum(&["info", "--meta", s(&disk.meta), "--json"]);
    assert_exit(&o, 0);
    let j = json(&o);
    assert_eq!(j["version"], 3);
    assert_eq!(j["block_size"], 512);
    assert_eq!(j["blocks"], 100);
    assert_eq!(j["data_size"], 51200);
    assert_eq!(j["clean"], true);
    assert_eq!(j["sync_mode"], false);
    assert_eq!(j["hash"], "xxh3-64");
    assert!(j["salt"].is_string());
    assert!(j["generation"].is_u64());
}

#[test]
fn info_text_names_the_fields() {
    let disk = formatted_disk(4096, 10);
    let o = twinsum(&["info", "--meta", s(&disk.meta)]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("block size:  4096"), "{out}");
    assert!(out.contains("clean:       yes"), "{out}");
}

#[test]
fn two_formats_use_different_salts() {
    let a = formatted_disk(4096, 8);
    let b = formatted_disk(4096, 8);
    let salt = |d: &Disk| json(&twinsum(&["info", "--meta", s(&d.meta), "--json"]))["salt"].clone();
    assert_ne!(salt(&a), salt(&b));
}

#[test]
fn check_of_a_sparse_terabyte_names_a_block_written_behind_its_back() {
    let disk = Disk::new();
    let o = disk.format_sized("1T");
    assert_exit(&o, 0);
    let block = (1u64 << 40) / 4096 - 12345;
    let f = OpenOptions::new()
        .write(true)
        .open(&disk.img)
        .expect("open");
    f.write_all_at(&[7u8; 100], block * 4096 + 50)
        .expect("write");
    let o = disk.check(true);
    assert_exit(&o, 1);
    let j = json(&o);
    assert_eq!(j["mismatches"], serde_json::json!([block]));
    assert_eq!(j["checked"], (1u64 << 40) / 4096);
}

#[test]
fn format_reserves_the_whole_table_yet_it_reads_as_one_hole() {
    let disk = Disk::new();
    let o = disk.format_sized("16G");
    assert_exit(&o, 0);
    let fs_type = Command::new("stat")
        .args(["-f", "-c", "%T", s(&disk.meta)])
        .output()
        .expect("stat -f");
    if String::from_utf8_lossy(&fs_type.stdout).trim() != "tmpfs" {
        // 16 MiB of table: a sparse one would hold only the log (32 MiB,
        // written) and the superblock.
        let m = fs::metadata(&disk.meta).expect("meta");
        assert!(
            m.blocks() * 512 >= m.len(),
            "{} of {} bytes of metadata allocated",
            m.blocks() * 512,
            m.len()
        );
    }
    // Still a fresh table: every block is a hole on both sides, checked
    // without reading the table.
    let o = disk.check(true);
    assert_exit(&o, 0);
    assert_eq!(json(&o)["checked"], (16u64 << 30) / 4096);
}

#[test]
fn format_refuses_metadata_on_the_image_itself_even_with_force() {
    let disk = Disk::new();
    disk.write_known_data(4096, 8);
    let before = fs::read(&disk.img).expect("image");
    let o = twinsum(&[
        "format",
        "--data",
        s(&disk.img),
        "--meta",
        s(&disk.img),
        "--force",
    ]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("same file"), "{}", stderr(&o));
    assert_eq!(fs::read(&disk.img).expect("image"), before);
}

/// Hold an exclusive flock on `path`, as a running `serve` does.
fn hold_lock(path: &Path) -> File {
    let f = File::open(path).expect("open");
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "lock {}", path.display());
    f
}

#[test]
fn check_and_format_refuse_an_image_in_use_by_another_process() {
    let disk = formatted_disk(4096, 16);
    let held = hold_lock(&disk.img);
    let o = disk.check(false);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    let forced = twinsum(&[
        "format",
        "--data",
        s(&disk.img),
        "--meta",
        s(&disk.meta),
        "--force",
    ]);
    assert_exit(&forced, 2);
    drop(held);
    assert_exit(&disk.check(false), 0);
}

#[test]
fn two_checks_may_run_at_once() {
    let disk = formatted_disk(4096, 16);
    let f = File::open(&disk.img).expect("open");
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    assert_exit(&disk.check(false), 0);
}
