//! One contract, every [`Device`]: the same checks over each
//! implementation, so that the engine can rely on the trait and not on the
//! device behind it.
//!
//! Each device is one line of `conformance!` at the end of this file: a
//! module named after it whose tests are the checks below. A new device
//! (an io_uring one, say) is one more line.
//!
//! The checks: the size; writes read back, at any offset and length, the
//! later of two overlapping writes winning, whether written by `write_at`
//! or `write_durable`; a range past the end refused by `read_at`,
//! `write_at`, `write_durable` and `zero_range` (and the device left as it
//! was), an empty range at the end accepted; `zero_range` reads back zeros and
//! touches nothing around it; `next_data` never hides data, never reports a
//! region that reads non-zero as a hole, and either reports everything as
//! data (a device that cannot tell) or reports holes (a sparse file); and
//! `sync` makes writes durable where that can be observed (a volatile
//! device's power cut, a file reopened); `write_durable` makes its own
//! range durable when it returns, with no sync, and (on the simulated
//! volatile disk the crash model runs on) nothing more than that range.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use twinsum::io::volatile::testing::FaultInjection;
use twinsum::io::volatile::VolatileDevice;
use twinsum::io::{Device, FileDevice, MemDevice, OpenFlags};
use twinsum::meta::{Metadata, Superblock};
use twinsum::writelog::{Dev, WriteLog};

/// Size of every device under test: 256 blocks of 4096 bytes.
const SIZE: u64 = 1 << 20;

/// What `next_data` may say of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holes {
    /// It cannot tell: everything from the offset on is data.
    AllData,
    /// A fresh device is one hole, and data only where it was written.
    Sparse,
    /// A fresh device is all data (a file whose every byte was written).
    Allocated,
}

/// A device under test, with what the checks may expect of it.
struct Subject {
    dev: Arc<dyn Device>,
    holes: Holes,
    /// `zero_range` of whole blocks leaves a hole that `next_data` skips.
    punches: bool,
    /// The same device as a [`VolatileDevice`], to cut its power.
    volatile: Option<Arc<VolatileDevice>>,
    /// The file behind the device, to reopen it, and its directory.
    file: Option<(tempfile::TempDir, PathBuf)>,
}

impl Subject {
    fn mem() -> Self {
        Self {
            dev: Arc::new(MemDevice::new(SIZE)),
            holes: Holes::AllData,
            punches: false,
            volatile: None,
            file: None,
        }
    }

    fn volatile(configure: impl FnOnce(VolatileDevice) -> VolatileDevice) -> Self {
        let v = Arc::new(configure(VolatileDevice::zeroed(SIZE)));
        Self {
            dev: v.clone(),
            holes: Holes::AllData,
            punches: false,
            volatile: Some(v),
            file: None,
        }
    }

    /// A regular file of [`SIZE`] bytes, every byte written (`sparse`:
    /// none, one hole), opened by `open`.
    fn file(sparse: bool, open: impl FnOnce(&Path) -> Arc<dyn Device>) -> Self {
        let (dir, path) = scratch_file(sparse);
        Self {
            dev: open(&path),
            holes: if sparse {
                Holes::Sparse
            } else {
                Holes::Allocated
            },
            punches: true,
            volatile: None,
            file: Some((dir, path)),
        }
    }

    /// A volatile cache in front of a sparse file, as `serve
    /// --volatile-cache` runs. A zeroed range waits in the cache as a
    /// version of its own, so it is reported as data until destaged.
    fn volatile_over_sparse_file() -> Self {
        let (dir, path) = scratch_file(true);
        let v = Arc::new(VolatileDevice::new(open_file(&path)));
        Self {
            dev: v.clone(),
            holes: Holes::Sparse,
            punches: false,
            volatile: Some(v),
            file: Some((dir, path)),
        }
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len];
        self.dev
            .read_at(&mut buf, offset)
            .unwrap_or_else(|e| panic!("read of {offset}+{len}: {e}"));
        buf
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.dev
            .write_at(data, offset)
            .unwrap_or_else(|e| panic!("write of {offset}+{}: {e}", data.len()));
    }

    /// The file behind the device, opened again once every handle on it
    /// is closed, with the directory that holds it; `None` without a file.
    fn reopened(self) -> Option<(tempfile::TempDir, Arc<dyn Device>)> {
        let Self {
            dev,
            volatile,
            file,
            ..
        } = self;
        let (dir, path) = file?;
        drop((dev, volatile));
        let again = open_file(&path);
        Some((dir, again))
    }

    /// Every region `next_data` reports from 0 on, checked for shape.
    fn data_regions(&self) -> Vec<(u64, u64)> {
        let mut regions = Vec::new();
        let mut at = 0;
        while let Some((start, end)) = self.dev.next_data(at).expect("next_data") {
            assert!(
                at <= start && start < end && end <= SIZE,
                "next_data({at}) = ({start}, {end}): not a non-empty region at or after {at} inside the device"
            );
            regions.push((start, end));
            at = end;
        }
        regions
    }
}

/// A file of [`SIZE`] bytes in a fresh directory: one hole if `sparse`,
/// else every byte written.
fn scratch_file(sparse: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("device.img");
    if sparse {
        drop(FileDevice::create(&path, SIZE, false, false).expect("create a sparse file"));
    } else {
        std::fs::write(&path, vec![0u8; SIZE as usize]).expect("write a file");
    }
    (dir, path)
}

fn open_file(path: &Path) -> Arc<dyn Device> {
    let flags = OpenFlags {
        writable: true,
        lock: true,
    };
    Arc::new(FileDevice::open(path, flags).expect("open the file"))
}

/// The file as `serve --log-writes` sees it: behind the write log's
/// recording wrapper, logging to a file next to it (for a disk whose
/// metadata is there too).
fn open_recorded(path: &Path) -> Arc<dyn Device> {
    let sb = Superblock::new(4096, SIZE, 1).expect("a superblock");
    let meta_path = path.with_extension("meta");
    let meta: Arc<dyn Device> = Arc::new(
        FileDevice::create(&meta_path, sb.meta_len(), false, false).expect("create metadata"),
    );
    Metadata::create(meta.clone(), sb, 1).expect("format metadata");
    let log = WriteLog::open(&path.with_extension("log"), &meta).expect("open a write log");
    log.recording(Dev::Data, open_file(path))
}

/// Bytes that differ per offset and per `seed`, never all zero.
fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i).wrapping_mul(31) as u8 ^ seed) | 1)
        .collect()
}

// ---- the checks --------------------------------------------------------------

fn size(s: Subject) {
    assert_eq!(s.dev.size(), SIZE);
}

fn round_trip(s: Subject) {
    round_trip_with(&s, |offset, data| s.write(offset, data));
}

fn write_durable_round_trip(s: Subject) {
    round_trip_with(&s, |offset, data| {
        s.dev
            .write_durable(data, offset)
            .unwrap_or_else(|e| panic!("write_durable of {offset}+{}: {e}", data.len()))
    });
}

/// Writes by `write` read back, alone and overlapping.
fn round_trip_with(s: &Subject, write: impl Fn(u64, &[u8])) {
    // Aligned, unaligned, across a 512-byte and a 4096-byte boundary, the
    // last byte, and the whole device.
    let cases: [(u64, usize); 6] = [
        (0, 4096),
        (4096 * 7, 512),
        (1000, 3000),
        (4096 * 9 - 100, 200),
        (SIZE - 1, 1),
        (0, SIZE as usize),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(offset, len, i as u8);
        write(offset, &data);
        assert!(
            s.read(offset, len) == data,
            "{offset}+{len} does not read back what was written"
        );
    }
    // Overlapping writes: the later one wins where they overlap, the
    // earlier one stays where they do not.
    let (a, b) = (pattern(8192, 8192, 0x40), pattern(12288, 8192, 0x80));
    write(8192, &a);
    write(12288, &b);
    let got = s.read(8192, 12288);
    assert!(got[..4096] == a[..4096], "the earlier write's own part");
    assert!(got[4096..] == b[..], "the later write, over the overlap");
    // A read of part of a write.
    assert!(s.read(8192 + 100, 50) == a[100..150]);
}

fn out_of_range_is_refused(s: Subject) {
    let before = s.read(0, SIZE as usize);
    let ranges: [(u64, u64); 4] = [(SIZE, 1), (SIZE - 1, 2), (SIZE + 4096, 4096), (u64::MAX, 1)];
    for (offset, len) in ranges {
        let mut buf = vec![0u8; len as usize];
        assert!(
            s.dev.read_at(&mut buf, offset).is_err(),
            "read of {offset}+{len} accepted"
        );
        assert!(
            s.dev.write_at(&vec![0x5a; len as usize], offset).is_err(),
            "write of {offset}+{len} accepted"
        );
        assert!(
            s.dev
                .write_durable(&vec![0x5a; len as usize], offset)
                .is_err(),
            "write_durable of {offset}+{len} accepted"
        );
        assert!(
            s.dev.zero_range(offset, len).is_err(),
            "zero_range of {offset}+{len} accepted"
        );
    }
    assert!(
        s.dev.zero_range(4096, u64::MAX).is_err(),
        "zero_range whose end overflows accepted"
    );
    assert!(
        s.read(0, SIZE as usize) == before,
        "a refused call changed the device"
    );
    // An empty range at the very end is inside the device.
    s.dev.read_at(&mut [], SIZE).expect("empty read at the end");
    s.dev.write_at(&[], SIZE).expect("empty write at the end");
    s.dev
        .write_durable(&[], SIZE)
        .expect("empty write_durable at the end");
    s.dev
        .zero_range(SIZE, 0)
        .expect("empty zero_range at the end");
}

fn zero_range_reads_back_zeros(s: Subject) {
    let all = pattern(0, SIZE as usize, 7);
    s.write(0, &all);
    // Whole blocks (a file system can punch them), and an unaligned range
    // that must be zeroed in part of a block.
    for (offset, len) in [(65536u64, 65536u64), (1000, 5000), (SIZE - 4096, 4096)] {
        s.dev.zero_range(offset, len).expect("zero_range");
        let (lo, hi) = (offset as usize, (offset + len) as usize);
        let got = s.read(0, SIZE as usize);
        assert!(
            got[lo..hi].iter().all(|&b| b == 0),
            "{offset}+{len} does not read as zeros"
        );
        s.write(offset, &all[lo..hi]);
    }
    // Nothing around the zeroed ranges was touched.
    assert!(s.read(0, SIZE as usize) == all);
}

fn next_data_never_hides_data(s: Subject) {
    let writes = [(0u64, 100usize), (300_000, 4096), (SIZE - 10, 10)];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        s.write(offset, &pattern(offset, len, i as u8));
    }
    s.dev.zero_range(65536, 65536).expect("zero_range");
    let regions = s.data_regions();
    // Every written byte lies in a reported region (a device may report
    // one region per cached unit: adjacent regions count together).
    for (offset, len) in writes {
        let mut at = offset;
        for &(a, b) in &regions {
            if a <= at && at < b {
                at = b;
            }
        }
        assert!(
            at >= offset + len as u64,
            "written range {offset}+{len} is not covered by the data regions {regions:?} (byte {at} is not)"
        );
    }
    // What is reported as a hole reads as zeros.
    let all = s.read(0, SIZE as usize);
    let mut at = 0;
    for &(start, end) in regions.iter().chain([(SIZE, SIZE)].iter()) {
        assert!(
            all[at as usize..start as usize].iter().all(|&b| b == 0),
            "hole {at}..{start} does not read as zeros"
        );
        at = end;
    }
    assert_eq!(s.dev.next_data(SIZE).expect("next_data"), None);
    assert_eq!(s.dev.next_data(SIZE + 4096).expect("next_data"), None);
}

fn next_data_reports_what_the_device_knows(s: Subject) {
    let from = |offset: u64| s.dev.next_data(offset).expect("next_data");
    const AT: u64 = 512 * 1024;
    match s.holes {
        Holes::AllData | Holes::Allocated => {
            assert_eq!(from(0), Some((0, SIZE)), "a fresh device is all data");
        }
        Holes::Sparse => assert_eq!(from(0), None, "a fresh sparse device is one hole"),
    }
    s.write(AT, &pattern(AT, 4096, 1));
    match s.holes {
        Holes::AllData => {
            // From any offset, everything up to the end is data.
            for offset in [0, 1, 128 * 1024, 200_000, SIZE - 1] {
                assert_eq!(from(offset), Some((offset, SIZE)), "next_data({offset})");
            }
        }
        Holes::Allocated => assert_eq!(from(0), Some((0, SIZE))),
        Holes::Sparse => {
            let (start, end) = from(0).expect("the write is data");
            assert!(
                start > 0 && start <= AT && end > AT,
                "next_data(0) = ({start}, {end}): only the write at {AT} is data"
            );
        }
    }
    if s.punches {
        // Whole blocks zeroed become a hole: the next data starts after it.
        let (lo, hi) = (128 * 1024, 256 * 1024);
        s.write(lo, &pattern(lo, (hi - lo) as usize, 2));
        s.dev.zero_range(lo, hi - lo).expect("zero_range");
        let (start, end) = from(lo).expect("the write at 512 KiB is data");
        assert!(
            (hi..=AT).contains(&start) && end > AT,
            "next_data({lo}) = ({start}, {end}): the zeroed {lo}..{hi} should be a hole"
        );
    }
}

fn reserve_changes_nothing_it_reads_as(s: Subject) {
    let writes = [(4096u64, 8192usize), (600_000, 100)];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        s.write(offset, &pattern(offset, len, i as u8));
    }
    let before = (s.read(0, SIZE as usize), s.data_regions());
    s.dev.reserve(0, SIZE).expect("reserve the whole device");
    s.dev.reserve(SIZE, 0).expect("an empty reserve at the end");
    assert!(
        s.dev.reserve(SIZE - 4096, 8192).is_err(),
        "a reserve past the end is refused"
    );
    // Same bytes, and no data hidden in a hole. (A file system may report
    // a reserved range whose pages it caches as data: that costs a read,
    // never a wrong answer.)
    assert!(
        s.read(0, SIZE as usize) == before.0,
        "reserve changed the content"
    );
    let after = s.data_regions();
    for (start, end) in before.1 {
        assert!(
            after.iter().any(|&(a, b)| a <= start && end <= b),
            "data {start}..{end} is not in the data regions {after:?} after reserve"
        );
    }
    if let Some((_, path)) = &s.file {
        let in_memory = on_tmpfs(path);
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap());
        if s.holes == Holes::Sparse && !in_memory {
            // A sparse file is allocated in full now (st_blocks counts
            // 512-byte units), so no later write of it can hit ENOSPC.
            assert!(
                blocks * 512 >= SIZE,
                "{blocks} sectors allocated after reserving {SIZE} bytes"
            );
        }
    }
}

/// Whether `path` is on tmpfs, where `reserve` leaves files sparse.
///
/// Asked with `statfs` rather than by running `stat -f`: a fork from one
/// test thread holds every open descriptor until its exec, so it would
/// keep another test's `flock` alive across that test's close and reopen.
fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: statfs is plain integers, for which all zeros is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a live statfs for it to fill.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert_eq!(
        rc,
        0,
        "statfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    st.f_type as i64 == TMPFS_MAGIC
}

fn sync_makes_writes_durable(s: Subject) {
    let data = pattern(4096, 8192, 3);
    if let Some(v) = &s.volatile {
        // Observable: a power cut before the sync may lose a write (one
        // sector, so that even a cache limit keeps it cached; here the cut
        // drops everything it may), one after the sync keeps it whatever
        // the cut chooses.
        s.write(4096, &data[..512]);
        v.power_cut_with(|_, _| 0).expect("power cut");
        assert!(
            s.read(4096, 512) == [0; 512],
            "a power cut that drops every cached sector kept an un-synced write"
        );
        s.write(4096, &data);
        s.dev.sync().expect("sync");
        for seed in 0..8 {
            v.power_cut(seed).expect("power cut");
            assert!(
                s.read(4096, 8192) == data,
                "a synced write lost at a power cut (seed {seed})"
            );
        }
        assert!(v.durable_snapshot().expect("snapshot")[4096..12288] == data[..]);
    } else {
        s.write(4096, &data);
        s.dev.sync().expect("sync");
        assert!(s.read(4096, 8192) == data);
    }
    if let Some((_dir, again)) = s.reopened() {
        // A file reopened after the sync holds the write.
        let mut buf = vec![0u8; 8192];
        again.read_at(&mut buf, 4096).expect("read");
        assert!(
            buf == data,
            "the reopened file does not hold the synced write"
        );
    }
}

fn write_durable_is_durable_on_return(s: Subject) {
    // A sector-aligned range and one that starts and ends inside sectors
    // (three sectors: with the writes below, still under the cache limit
    // of 8 versions, so that no destage of the whole cache hides what
    // write_durable alone made durable; the first is larger than the
    // limit, written through).
    let ranges: [(u64, usize); 2] = [(8192, 8192), (40_000, 1000)];
    let datas: Vec<Vec<u8>> = ranges
        .iter()
        .enumerate()
        .map(|(i, &(offset, len))| pattern(offset, len, 0x20 + i as u8))
        .collect();
    // An ordinary write next to each range (the second in the same
    // 4096-byte block), and one far from both; none of them synced. One
    // sector each, so that even a cache limit keeps them cached.
    let others: [(u64, usize); 3] = [(7680, 512), (43_520, 512), (SIZE - 8192, 512)];
    for (i, &(offset, len)) in others.iter().enumerate() {
        s.write(offset, &pattern(offset, len, 0x60 + i as u8));
    }
    for (&(offset, _), data) in ranges.iter().zip(&datas) {
        s.dev.write_durable(data, offset).expect("write_durable");
        assert!(s.read(offset, data.len()) == *data, "{offset}: reads back");
    }
    if let Some(v) = &s.volatile {
        // Observable: a power cut now, dropping every sector it may, keeps
        // each durable range whole...
        v.power_cut_with(|_, _| 0).expect("power cut");
        for (&(offset, len), data) in ranges.iter().zip(&datas) {
            assert!(
                s.read(offset, len) == *data,
                "write_durable of {offset}+{len} returned, but a power cut lost it"
            );
        }
        let snapshot = v.durable_snapshot().expect("snapshot");
        for (&(offset, len), data) in ranges.iter().zip(&datas) {
            assert!(snapshot[offset as usize..offset as usize + len] == data[..]);
        }
        // ... and loses the ordinary writes, outside those ranges: the
        // crash model's disk promises no more than the contract, so an
        // engine that relied on write_durable syncing its other writes
        // would be caught there.
        // (A unit that a range covers in part is made durable whole.)
        let unit = v.atomic_unit();
        let in_a_durable_unit = |b: u64| {
            ranges
                .iter()
                .any(|&(o, l)| o / unit <= b / unit && b / unit <= (o + l as u64 - 1) / unit)
        };
        for &(offset, len) in &others {
            let kept: Vec<u64> = (offset..offset + len as u64)
                .filter(|&b| !in_a_durable_unit(b) && snapshot[b as usize] != 0)
                .collect();
            assert!(
                kept.is_empty(),
                "an un-synced write at {offset}+{len} survived a power cut that dropped everything un-synced (bytes {:?}...): write_durable synced more than its range",
                &kept[..kept.len().min(4)]
            );
        }
    }
    if let Some((_dir, again)) = s.reopened() {
        // The file itself holds each range, reopened (for a volatile cache
        // over a file: destaged to it, not only kept in the cache).
        for (&(offset, len), data) in ranges.iter().zip(&datas) {
            let mut buf = vec![0u8; len];
            again.read_at(&mut buf, offset).expect("read");
            assert!(
                buf == *data,
                "the reopened file does not hold the write_durable at {offset}+{len}"
            );
        }
    }
}

// ---- the devices -----------------------------------------------------------

/// `checks!(subject; check, ...)`: one test per check, each on a fresh
/// `subject`, calling the check of the same name.
macro_rules! checks {
    ($subject:expr; $($check:ident),* $(,)?) => {$(
        #[test]
        fn $check() {
            super::$check($subject);
        }
    )*};
}

/// `conformance! { name => subject; ... }`: one module per device, with
/// every check.
macro_rules! conformance {
    ($($name:ident => $subject:expr;)*) => {$(
        mod $name {
            use super::*;

            checks!($subject;
                size,
                round_trip,
                out_of_range_is_refused,
                zero_range_reads_back_zeros,
                next_data_never_hides_data,
                next_data_reports_what_the_device_knows,
                sync_makes_writes_durable,
                reserve_changes_nothing_it_reads_as,
                write_durable_round_trip,
                write_durable_is_durable_on_return,
            );
        }
    )*};
}

conformance! {
    mem => Subject::mem();
    volatile => Subject::volatile(|v| v);
    volatile_cache_limit => Subject::volatile(|v| v.with_cache_limit(8));
    volatile_atomic_4096 => Subject::volatile(|v| v.with_atomic_unit(4096).unwrap());
    file => Subject::file(false, open_file);
    sparse_file => Subject::file(true, open_file);
    volatile_over_sparse_file => Subject::volatile_over_sparse_file();
    recorded_sparse_file => Subject::file(true, open_recorded);
}
