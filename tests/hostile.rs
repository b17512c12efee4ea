//! `twinsum serve` against a front-end that sends what no driver should:
//! a ring entry that cannot be completed, a memory table that lies about
//! its file, a file that shrinks under the daemon, buffers that change
//! while their request is in flight, and (in `fuzz`) random chains,
//! headers, ring indices, protocol messages and disconnects.
//!
//! The front-end is tests/common/frontend.rs: the vhost crate's protocol
//! side over rings laid out by hand in a memfd.

mod common;

use std::time::Duration;

use common::frontend::*;
use common::{pattern, poll, Daemon, Disk};

const MIB: u64 = 1 << 20;

/// Wait for `n` completions on queue `q`, failing at once (with the exit
/// status and the log) if the daemon dies meanwhile.
fn complete(d: &mut Daemon, f: &mut Front, q: usize, n: usize) -> Vec<Used> {
    let mut got = Vec::new();
    poll(&format!("{n} completions on queue {q}"), || {
        if let Some(st) = d.exited() {
            panic!(
                "twinsum serve died ({st}) with requests in flight:\n{}",
                d.log()
            );
        }
        got.extend(f.vqs[q].wait_used_for(&f.mem, n - got.len(), Duration::from_millis(20)));
        (got.len() >= n).then_some(())
    });
    got
}

fn assert_alive(d: &mut Daemon) {
    if let Some(st) = d.exited() {
        panic!("twinsum serve died ({st}):\n{}", d.log());
    }
}

/// A fresh, honest front-end writes and reads back.
fn serves_a_good_write(disk: &Disk, offset: u64) {
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("connect");
    let data = pattern(offset, 8192, 0x600d);
    assert_eq!(f.write(0, offset, &data), VIRTIO_BLK_S_OK);
    assert_eq!(f.read(0, offset, 8192), (VIRTIO_BLK_S_OK, data));
}

#[test]
fn a_head_that_cannot_be_completed_does_not_lose_the_others() {
    let disk = Disk::new(4 * MIB, 4096);
    let mut d = disk.serve(&[]);
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("connect");
    let a = pattern(0, 4096, 1);
    let b = pattern(65536, 4096, 2);
    assert_eq!(f.write(0, 0, &a), VIRTIO_BLK_S_OK);
    assert_eq!(f.write(0, 65536, &b), VIRTIO_BLK_S_OK);

    // One drain: [read A, head 999, read B].
    let m = &f.mem;
    let vq = &mut f.vqs[0];
    m.header(hdr(0), VIRTIO_BLK_T_IN, 0);
    m.header(hdr(1), VIRTIO_BLK_T_IN, 128);
    m.fill(data(0), 4096, 0xee);
    m.fill(data(1), 4096, 0xee);
    m.write(status(0), &[0xff]);
    m.write(status(1), &[0xff]);
    let h0 = vq.set_chain(
        m,
        0,
        &[
            Desc::rd(hdr(0), 16),
            Desc::wr(data(0), 4096),
            Desc::wr(status(0), 1),
        ],
    );
    let h1 = vq.set_chain(
        m,
        3,
        &[
            Desc::rd(hdr(1), 16),
            Desc::wr(data(1), 4096),
            Desc::wr(status(1), 1),
        ],
    );
    vq.publish(m, &[h0, 999, h1]);
    vq.kick();
    let used = complete(&mut d, &mut f, 0, 2);
    assert_eq!(
        used.iter().map(|u| u.id).collect::<Vec<_>>(),
        [u32::from(h0), u32::from(h1)],
        "both good reads completed, in order, and the bad head skipped"
    );
    let m = &f.mem;
    assert_eq!(m.read(status(0), 1)[0], VIRTIO_BLK_S_OK);
    assert_eq!(m.read(status(1), 1)[0], VIRTIO_BLK_S_OK);
    assert_eq!(m.read(data(0), 4096), a);
    assert_eq!(m.read(data(1), 4096), b);
    d.wait_for_log("999");
    // The ring goes on working.
    assert_eq!(f.read(0, 0, 4096), (VIRTIO_BLK_S_OK, a));
    assert_eq!(d.log_count("999"), 1, "one log line for the bad head");
    assert_alive(&mut d);
}

#[test]
fn a_memory_table_bigger_than_its_file_is_refused() {
    let disk = Disk::new(4 * MIB, 4096);
    let mut d = disk.serve(&[]);
    let opts = Options {
        mem_len: 16 << 20,
        file_len: Some(MIB),
        ..Options::default()
    };
    let r = Front::connect(&disk.socket, &opts);
    if let Ok(mut f) = r {
        // Accepted: a write whose data lies past the end of the file shows
        // what that costs.
        let m = &f.mem;
        m.header(hdr(0), VIRTIO_BLK_T_OUT, 0);
        m.write(status(0), &[0xff]);
        let vq = &mut f.vqs[0];
        let h = vq.set_chain(
            m,
            0,
            &[
                Desc::rd(hdr(0), 16),
                Desc::rd(8 * MIB, 4096),
                Desc::wr(status(0), 1),
            ],
        );
        vq.publish(m, &[h]);
        vq.kick();
        let got = complete(&mut d, &mut f, 0, 1);
        panic!(
            "a memory table 16 times larger than its file was accepted (completion {got:?}, \
             status {})",
            f.mem.read(status(0), 1)[0]
        );
    }
    d.wait_for_log("memory region");
    assert_alive(&mut d);
    serves_a_good_write(&disk, 0);
    assert_eq!(
        d.log_count("memory region"),
        1,
        "one log line:\n{}",
        d.log()
    );

    // A memfd sealed against shrinking is accepted as it is.
    let opts = Options {
        seals: libc::F_SEAL_SHRINK,
        ..Options::default()
    };
    let mut f = Front::connect(&disk.socket, &opts).expect("a sealed memfd");
    assert_eq!(f.flush(0), VIRTIO_BLK_S_OK);
}

#[test]
fn a_memory_file_that_shrinks_later_fails_requests_not_the_daemon() {
    let disk = Disk::new(4 * MIB, 4096);
    let mut d = disk.serve(&[]);
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("connect");
    let old = pattern(0, 8192, 3);
    assert_eq!(f.write(0, 0, &old), VIRTIO_BLK_S_OK);
    assert_eq!(f.read(0, 0, 8192), (VIRTIO_BLK_S_OK, old.clone()));

    // The rings, headers and status bytes stay; the data buffers go.
    f.mem.truncate(DATA_BASE);
    for (ty, writable) in [(VIRTIO_BLK_T_OUT, false), (VIRTIO_BLK_T_IN, true)] {
        let m = &f.mem;
        m.header(hdr(0), ty, 0);
        m.write(status(0), &[0xff]);
        let buf = if writable {
            Desc::wr(data(0), 8192)
        } else {
            Desc::rd(data(0), 8192)
        };
        let vq = &mut f.vqs[0];
        let h = vq.set_chain(m, 0, &[Desc::rd(hdr(0), 16), buf, Desc::wr(status(0), 1)]);
        vq.publish(m, &[h]);
        vq.kick();
        complete(&mut d, &mut f, 0, 1);
        assert_eq!(
            f.mem.read(status(0), 1)[0],
            VIRTIO_BLK_S_IOERR,
            "request type {ty} on vanished memory"
        );
    }
    assert_alive(&mut d);
    drop(f);
    // The failed write changed nothing.
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("connect");
    assert_eq!(f.read(0, 0, 8192), (VIRTIO_BLK_S_OK, old));
    drop(f);
    serves_a_good_write(&disk, MIB);
    assert_alive(&mut d);
}
