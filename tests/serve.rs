//! `twinsum serve` over its real socket, driven by libblkio's
//! virtio-blk-vhost-user driver as the front-end.

mod common {
    pub mod client;
    pub mod content;
    pub mod disk;
    pub mod run;
    pub mod stage;
}

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::thread;

use blkio::ReqFlags;
use common::client::{Client, Errno, Queue};
use common::content::pattern;
use common::disk::{twinsum, Daemon, Disk};
use common::run::{poll, s};
use common::stage::craft_stage;

const MIB: u64 = 1 << 20;
const EIO: i32 = -libc::EIO;

/// Request sizes each queue cycles through, in blocks.
const SIZES: [u64; 5] = [1, 2, 8, 3, 32];

/// The requests only these tests issue.
impl Queue<'_> {
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.q.write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        self.complete()
    }
}

/// Each queue writes and reads back its own region concurrently with the
/// others; returns the (offset, seed) of every write so the caller can
/// read them again later.
fn write_patterns_concurrently(
    client: &mut Client,
    bs: u64,
    region: u64,
    seed: u64,
) -> Vec<(u64, usize)> {
    let queues = client.queues();
    let n = queues.len() as u64;
    assert!(n >= 2, "the test needs at least two queues");
    thread::scope(|scope| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                scope.spawn(move || {
                    let mut written = Vec::new();
                    let mut off = i as u64 * region;
                    let end = off + region;
                    for k in 0.. {
                        let len = SIZES[k % SIZES.len()] * bs;
                        if off + len > end {
                            break;
                        }
                        let data = pattern(off, len as usize, seed);
                        q.write(off, &data).expect("write");
                        assert_eq!(q.read(off, len as usize).expect("read back"), data);
                        written.push((off, len as usize));
                        off += len;
                    }
                    q.flush().expect("flush");
                    written
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("queue thread"))
            .collect()
    })
}

fn verify(client: &mut Client, written: &[(u64, usize)], seed: u64) {
    let mut q = client.q0();
    for &(off, len) in written {
        assert_eq!(
            q.read(off, len).expect("read"),
            pattern(off, len, seed),
            "at {off}"
        );
    }
}

fn patterns_survive_queues_and_restart(bs: u64) {
    let disk = Disk::new(16 * MIB, bs);
    let d = disk.serve(&["--queues", "2"]);
    let written = {
        let mut c = Client::connect(&disk.socket, 2);
        assert_eq!(c.capacity(), 16 * MIB);
        let w = write_patterns_concurrently(&mut c, bs, 2 * MIB, 7);
        verify(&mut c, &w, 7);
        w
    };
    // A second front-end after the first disconnected sees the same data.
    {
        let mut c = Client::connect(&disk.socket, 2);
        verify(&mut c, &written, 7);
    }
    assert!(d.terminate().success());
    assert_eq!(disk.info()["clean"], true, "SIGTERM leaves clean metadata");
    assert!(!disk.socket.exists(), "SIGTERM removes the socket");

    let _d = disk.serve(&["--queues", "2"]);
    let mut c = Client::connect(&disk.socket, 2);
    verify(&mut c, &written, 7);
}

#[test]
fn patterns_survive_queues_and_restart_512() {
    patterns_survive_queues_and_restart(512);
}

#[test]
fn patterns_survive_queues_and_restart_4096() {
    patterns_survive_queues_and_restart(4096);
}

fn write_zeroes_and_discard_read_back_zeros(bs: u64) {
    let disk = Disk::new(8 * MIB, bs);
    let _d = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1);
    let mut q = c.q0();
    let len = 64 * bs;
    let data = pattern(0, len as usize, 3);
    q.write(0, &data).expect("write");
    q.write(MIB, &data).expect("write");

    q.write_zeroes(bs, 4 * bs).expect("write zeroes");
    let back = q.read(0, len as usize).expect("read after write-zeroes");
    assert_eq!(&back[..bs as usize], &data[..bs as usize]);
    assert!(back[bs as usize..5 * bs as usize].iter().all(|&b| b == 0));
    assert_eq!(&back[5 * bs as usize..], &data[5 * bs as usize..]);

    q.discard(MIB, 8 * bs).expect("discard");
    let back = q.read(MIB, len as usize).expect("read after discard");
    assert!(back[..8 * bs as usize].iter().all(|&b| b == 0));
    assert_eq!(&back[8 * bs as usize..], &data[8 * bs as usize..]);
    q.flush().expect("flush");
}

#[test]
fn write_zeroes_and_discard_read_back_zeros_512() {
    write_zeroes_and_discard_read_back_zeros(512);
}

#[test]
fn write_zeroes_and_discard_read_back_zeros_4096() {
    write_zeroes_and_discard_read_back_zeros(4096);
}

fn flipped_byte_fails_exactly_that_block(bs: u64) {
    let disk = Disk::new(4 * MIB, bs);
    let d = disk.serve(&[]);
    let data = pattern(0, 16 * bs as usize, 11);
    {
        let mut c = Client::connect(&disk.socket, 1);
        let mut q = c.q0();
        q.write(0, &data).expect("write");
        q.flush().expect("flush");
    }
    assert!(d.terminate().success());

    // Stopped daemon: the flip is certainly what the next one reads.
    disk.flip_byte(5 * bs + 17);
    let d = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1);
    let mut q = c.q0();
    assert_eq!(q.read(5 * bs, bs as usize), Err(EIO), "the flipped block");
    assert_eq!(q.read(0, 16 * bs as usize), Err(EIO), "a read covering it");
    for b in [4, 6] {
        let got = q.read(b * bs, bs as usize).expect("a neighbour");
        assert_eq!(got, &data[(b * bs) as usize..((b + 1) * bs) as usize]);
    }
    d.wait_for_log("block 5");

    // While serving: the engine reads with pread, so our pwrite is seen.
    disk.flip_byte(9 * bs);
    assert_eq!(
        q.read(9 * bs, bs as usize),
        Err(EIO),
        "flipped while serving"
    );
    assert!(q.read(8 * bs, bs as usize).is_ok());
    assert!(q.read(10 * bs, bs as usize).is_ok());
}

#[test]
fn flipped_byte_fails_exactly_that_block_512() {
    flipped_byte_fails_exactly_that_block(512);
}

#[test]
fn flipped_byte_fails_exactly_that_block_4096() {
    flipped_byte_fails_exactly_that_block(4096);
}

#[test]
fn on_mismatch_log_returns_the_data() {
    let disk = Disk::new(MIB, 4096);
    let d = disk.serve(&[]);
    let data = pattern(0, 4096, 5);
    {
        let mut c = Client::connect(&disk.socket, 1);
        c.q0().write(0, &data).expect("write");
    }
    assert!(d.terminate().success());
    disk.flip_byte(100);
    let _d = disk.serve(&["--on-mismatch", "log"]);
    let mut c = Client::connect(&disk.socket, 1);
    let got = c.q0().read(0, 4096).expect("read with --on-mismatch log");
    assert_eq!(got[100], data[100] ^ 0x5a);
}

#[test]
fn readonly_offers_ro_and_serves_reads() {
    let disk = Disk::new(MIB, 4096);
    let data = pattern(0, 8192, 1);
    {
        let d = disk.serve(&[]);
        let mut c = Client::connect(&disk.socket, 1);
        c.q0().write(0, &data).expect("write");
        drop(c);
        assert!(d.terminate().success());
    }
    let _d = disk.serve(&["--readonly"]);
    // libblkio refuses to start a read-write client on a disk that offers
    // VIRTIO_BLK_F_RO.
    match Client::try_connect(&disk.socket, 1, false) {
        Ok(_) => panic!("a read-write client started on a read-only disk"),
        Err(e) => assert_eq!(e.errno(), blkio::Errno::ROFS, "{e}"),
    }
    let mut c = Client::try_connect(&disk.socket, 1, true).expect("read-only client");
    let mut q = c.q0();
    assert_eq!(q.read(0, 8192).expect("read"), data);
    assert!(q.write(0, &data).is_err(), "write on a read-only disk");
    assert_eq!(
        disk.info()["clean"],
        true,
        "read-only serving keeps metadata clean"
    );
}

#[test]
fn a_second_daemon_on_the_same_image_is_refused() {
    let disk = Disk::new(MIB, 4096);
    let _d = disk.serve(&[]);
    // Same image, another socket.
    let other = disk.path("other.sock");
    let mut second = Daemon::spawn(&disk, &other, &[]);
    let st = second.wait_exit();
    assert_eq!(st.code(), Some(2), "{}", second.log());
    assert!(second.log().contains("in use"), "{}", second.log());
    assert!(!other.exists());

    // Same socket, another image.
    let disk2 = Disk::new(MIB, 512);
    let mut third = Daemon::spawn(&disk2, &disk.socket, &[]);
    let st = third.wait_exit();
    assert_eq!(st.code(), Some(2), "{}", third.log());
    assert!(third.log().contains("in use"), "{}", third.log());
    // The first daemon still serves.
    let mut c = Client::connect(&disk.socket, 1);
    c.q0().read(0, 4096).expect("read from the first daemon");
}

#[test]
fn stale_socket_is_replaced_and_the_socket_is_private() {
    let disk = Disk::new(MIB, 4096);
    drop(UnixListener::bind(&disk.socket).expect("bind"));
    assert!(disk.socket.exists(), "a stale socket file is left behind");
    let _d = disk.serve(&[]);
    let mode = std::fs::metadata(&disk.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = Client::connect(&disk.socket, 1);
    c.q0().read(0, 4096).expect("read");
}

#[test]
fn a_regular_file_in_place_of_the_socket_is_not_replaced() {
    let disk = Disk::new(MIB, 4096);
    std::fs::write(&disk.socket, b"precious").expect("write");
    let mut d = Daemon::spawn(&disk, &disk.socket, &[]);
    assert_eq!(d.wait_exit().code(), Some(2), "{}", d.log());
    assert_eq!(std::fs::read(&disk.socket).expect("read"), b"precious");
}

#[test]
fn sigusr1_and_disconnect_switch_to_synchronous_metadata() {
    const SYNC: &str = "front-end disconnected: metadata is now written synchronously";
    const CLEAN: &str = "front-end disconnected: metadata written back and marked clean";
    const LEAVE: &str = "the driver started the device: leaving synchronous metadata mode";
    let disk = Disk::new(MIB, 4096);
    let d = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1);
    c.q0().write(0, &pattern(0, 4096, 2)).expect("write");
    // A write marks the metadata dirty, in the commit round that moves
    // it out of the stage: just after it completed, maybe not yet.
    poll("the metadata marked dirty", || {
        (disk.info()["clean"] == false).then_some(())
    });
    d.signal(libc::SIGUSR1);
    d.wait_for_log("SIGUSR1: metadata is now written synchronously");
    assert_eq!(disk.info()["sync_mode"], true);
    c.q0().write(4096, &pattern(4096, 4096, 2)).expect("write");

    // The readiness probe was a front-end too: count from here.
    let (syncs, cleans, leaves) = (d.log_count(SYNC), d.log_count(CLEAN), d.log_count(LEAVE));
    drop(c);
    d.wait_for_log_count(SYNC, syncs + 1);
    d.wait_for_log_count(CLEAN, cleans + 1);
    assert_eq!(
        disk.info()["clean"],
        true,
        "disconnect leaves clean metadata"
    );

    // A new front-end starting its queues leaves synchronous mode.
    let mut c = Client::connect(&disk.socket, 1);
    c.q0().read(0, 4096).expect("read");
    d.wait_for_log_count(LEAVE, leaves + 1);
    drop(c);
    assert!(d.terminate().success());
    assert_eq!(disk.info()["clean"], true);
}

#[test]
fn bad_arguments_are_refused() {
    let disk = Disk::new(MIB, 4096);
    for bad in [
        &["--queues", "0"][..],
        &["--queue-size", "100"],
        &["--serial", "an-overly-long-serial-number"],
        &["--writeback-interval", "0"],
    ] {
        let mut d = Daemon::spawn(&disk, &disk.socket, bad);
        let st = d.wait_exit();
        assert!(!st.success(), "{bad:?} accepted");
        assert!(!disk.socket.exists(), "{bad:?}");
    }
    let o = twinsum(&[
        "serve",
        "--socket",
        s(&disk.socket),
        "--data",
        s(&disk.data),
    ]);
    assert!(!o.status.success());
}

#[test]
fn sigterm_with_a_front_end_attached_stops_cleanly() {
    let disk = Disk::new(MIB, 4096);
    let d = disk.serve(&[]);
    let data = pattern(0, 8192, 9);
    let mut c = Client::connect(&disk.socket, 2);
    c.q0().write(0, &data).expect("write");
    // The flush puts the write in the image; until then it may still wait
    // in the stage with the superblock clean, which is right too.
    c.q0().flush().expect("flush");
    assert_eq!(disk.info()["clean"], false, "serving with a write in");
    assert!(d.terminate().success());
    assert_eq!(disk.info()["clean"], true);
    assert!(!disk.socket.exists());
    drop(c);
    let _d = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1);
    assert_eq!(c.q0().read(0, 8192).expect("read"), data);
}

#[test]
fn sigint_while_idle_stops_cleanly() {
    let disk = Disk::new(MIB, 512);
    let mut d = disk.serve(&[]);
    d.signal(libc::SIGINT);
    assert!(d.wait_exit().success());
    assert!(!disk.socket.exists());
    assert_eq!(disk.info()["clean"], true);
}

#[test]
fn a_stage_left_by_a_dead_twinsum_is_replayed_before_serving() {
    let disk = Disk::new(MIB, 4096);
    let a = pattern(5 * 4096, 8192, 1);
    let b = pattern(5 * 4096, 4096, 2);
    // Two writes to block 5 in order: the later one must win.
    craft_stage(&disk, &[(5, a.clone()), (5, b.clone()), (9, a.clone())]);
    assert_eq!(disk.info()["stage_writes"], 3);
    let check = disk.check(&[]);
    assert_eq!(check.status.code(), Some(0));
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(
        err.contains("3 completed writes") && err.contains("replays them"),
        "{err}"
    );

    let d = disk.serve(&[]);
    assert!(
        d.log().contains("replayed 3 completed writes"),
        "{}",
        d.log()
    );
    let mut c = Client::connect(&disk.socket, 1);
    assert_eq!(c.q0().read(5 * 4096, 4096).unwrap(), b);
    assert_eq!(c.q0().read(6 * 4096, 4096).unwrap(), a[4096..]);
    assert_eq!(c.q0().read(9 * 4096, 8192).unwrap(), a);
    drop(c);
    assert!(d.terminate().success());
    assert!(!disk.stage.exists(), "an orderly stop removes the stage");
}

#[test]
fn bad_stage_files_are_refused_with_one_line() {
    let disk = Disk::new(MIB, 4096);
    let refused = |what: &str, needle: &str| {
        let mut d = Daemon::spawn(&disk, &disk.socket, &[]);
        let st = d.wait_exit();
        let log = d.log();
        assert_eq!(st.code(), Some(2), "{what}: {log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("twinsum:")).collect();
        assert_eq!(errors.len(), 1, "{what}: one line: {log}");
        assert!(errors[0].contains(needle), "{what}: {:?}", errors[0]);
        assert!(!disk.socket.exists(), "{what}: nothing served");
        assert!(disk.stage.exists(), "{what}: the stage is left alone");
    };

    std::fs::write(&disk.stage, vec![0x5a; 2 << 20]).unwrap();
    refused("garbage", "not a twinsum stage file");

    craft_stage(&disk, &[(1, pattern(4096, 4096, 3))]);
    let good = std::fs::read(&disk.stage).unwrap();
    std::fs::write(&disk.stage, &good[..1 << 20]).unwrap();
    refused("truncated", "the stage is truncated");

    let mut future = good.clone();
    future[8] = 9;
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&future[..504], 0);
    future[504..512].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&disk.stage, &future).unwrap();
    refused("future version", "stage version 9 is newer");

    let other = Disk::new(MIB, 4096);
    craft_stage(&other, &[(1, pattern(4096, 4096, 4))]);
    std::fs::copy(&other.stage, &disk.stage).unwrap();
    refused("other metadata", "belongs to other metadata");

    std::fs::remove_file(&disk.stage).unwrap();
    std::fs::create_dir(&disk.stage).unwrap();
    refused("unreadable", "cannot use the write-back stage");
    std::fs::remove_dir(&disk.stage).unwrap();

    // --readonly cannot replay a stage that holds writes.
    craft_stage(&disk, &[(1, pattern(4096, 4096, 5))]);
    let mut d = Daemon::spawn(&disk, &disk.socket, &["--readonly"]);
    assert_eq!(d.wait_exit().code(), Some(2), "{}", d.log());
    assert!(
        d.log().contains("serve without --readonly once"),
        "{}",
        d.log()
    );
    // And the writes are still there for a read-write serve.
    let _d = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1);
    assert_eq!(c.q0().read(4096, 4096).unwrap(), pattern(4096, 4096, 5));
}

/// Metadata of the first format (version 1, no log) is served as before
/// and stays version 1: nothing upgrades it behind the user's back. A
/// kill -9 in the middle leaves it unclean, and the restart reads every
/// completed write back.
#[test]
fn version_1_metadata_is_served_and_stays_version_1() {
    let disk = Disk::new_with(16 * MIB, 4096, |_| vec!["--meta-log".into(), "0".into()]);
    assert_eq!(disk.info()["version"], 1);
    let mut d = disk.serve(&["--queues", "2"]);
    let written = {
        let mut c = Client::connect(&disk.socket, 2);
        write_patterns_concurrently(&mut c, 4096, 2 * MIB, 11)
    };
    d.signal(libc::SIGKILL);
    d.wait_exit();
    assert_eq!(disk.info()["clean"], false, "killed while dirty");

    let d = disk.serve(&["--queues", "2"]);
    {
        let mut c = Client::connect(&disk.socket, 2);
        verify(&mut c, &written, 11);
    }
    assert!(d.terminate().success());
    let info = disk.info();
    assert_eq!(info["version"], 1, "still the first format");
    assert_eq!(info["clean"], true);
    let check = disk.check(&[]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Metadata that cannot be used is reported as the metadata's fault, in
/// one line, and the stage file this start made is not left in tmpfs.
#[test]
fn bad_metadata_is_refused_by_name_and_leaves_no_stage() {
    let disk = Disk::new(MIB, 4096);
    // A foreign superblock: the magic is gone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.meta)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"garbage!", 0))
        .expect("overwrite the superblock");
    let mut d = Daemon::spawn(&disk, &disk.socket, &[]);
    assert_eq!(d.wait_exit().code(), Some(2));
    let log = d.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not twinsum metadata"))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(!errors[0].contains("stage"), "blamed on the stage: {log}");
    assert!(
        !disk.stage.exists(),
        "stage {} left behind",
        disk.stage.display()
    );
}

/// Metadata an older twinsum formatted sparse gets its table reserved when
/// a writer opens it: a table page synced later then allocates nothing.
#[test]
fn serving_reserves_a_sparse_table_and_keeps_its_pairs() {
    let disk = Disk::new(16 << 30, 4096);
    let table = (16u64 << 30) / 4096 * 16;
    let d = disk.serve(&[]);
    let mut c = Client::connect(&d.socket, 1);
    let data = pattern(5 * MIB, 4096, 9);
    c.q0().write(5 * MIB, &data).expect("write");
    c.q0().flush().expect("flush");
    drop(c);
    assert!(d.terminate().success());
    // Punch the table's untouched pages as a sparse format would have left
    // them (the one written page stays).
    let page = 4096 + (5 * MIB / 4096) * 16 / 4096 * 4096;
    for (at, len) in [
        (4096, page - 4096),
        (page + 4096, table + 4096 - page - 4096),
    ] {
        let o = std::process::Command::new("fallocate")
            .args(["-p", "-o", &at.to_string(), "-l", &len.to_string()])
            .arg(&disk.meta)
            .output()
            .expect("fallocate -p");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let allocated =
        || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&disk.meta).unwrap()) * 512;
    let sparse = allocated();
    assert!(
        sparse < table,
        "the punched table still holds {sparse} bytes"
    );

    let d = disk.serve(&[]);
    let fs_type = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", s(&disk.meta)])
        .output()
        .expect("stat -f");
    if String::from_utf8_lossy(&fs_type.stdout).trim() != "tmpfs" {
        assert!(
            allocated() >= table,
            "{} bytes allocated for a table of {table}",
            allocated()
        );
    }
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.q0().read(5 * MIB, 4096).expect("read"), data);
    drop(c);
    assert!(d.terminate().success());
    assert!(disk.check(&[]).status.success());
}
