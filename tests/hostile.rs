//! `twinsum serve` against a front-end that sends what no driver should:
//! a ring entry that cannot be completed, a memory table that lies about
//! its file, a file that shrinks under the daemon, buffers that change
//! while their request is in flight, and (in `fuzz`) random chains,
//! headers, ring indices, protocol messages and disconnects.
//!
//! The front-end is tests/common/frontend.rs: the vhost crate's protocol
//! side over rings laid out by hand in a memfd.

mod common {
    pub mod content;
    pub mod disk;
    pub mod frontend;
    pub mod run;
}

use std::time::Duration;

use common::content::pattern;
use common::disk::{Daemon, Disk};
use common::frontend::*;
use common::run::poll;

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
    let size = std::fs::metadata(&disk.data).expect("image").len();
    assert_eq!(f.capacity().expect("config space"), size, "capacity");
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

#[test]
fn a_stuck_ring_is_logged_even_after_a_flood_of_bad_requests() {
    let disk = Disk::new(4 * MIB, 4096);
    let mut d = disk.serve(&[]);
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("connect");
    // More unsupported requests than the per-request log limit lets through.
    let m = &f.mem;
    let vq = &mut f.vqs[0];
    let mut heads = Vec::new();
    for k in 0..30u64 {
        m.header(hdr(k), 2, 0);
        m.write(status(k), &[0xff]);
        heads.push(vq.set_chain(
            m,
            2 * k as u16,
            &[Desc::rd(hdr(k), 16), Desc::wr(status(k), 1)],
        ));
    }
    vq.publish(m, &heads);
    vq.kick();
    complete(&mut d, &mut f, 0, 30);
    assert!((0..30).all(|k| f.mem.read(status(k), 1)[0] == VIRTIO_BLK_S_UNSUPP));

    // An avail index far ahead of the ring: the queue is stuck.
    let vq = &mut f.vqs[0];
    let real = vq.avail_idx;
    vq.set_avail_idx(&f.mem, real.wrapping_add(1000));
    vq.kick();
    d.wait_for_log("is stuck");
    for _ in 0..3 {
        f.vqs[0].kick();
    }
    // Repaired (publish writes the real index again), it serves.
    assert_eq!(f.flush(0), VIRTIO_BLK_S_OK);
    d.wait_for_log("works again");
    assert_eq!(d.log_count("is stuck"), 1, "logged once per stall");
    assert_alive(&mut d);
}

#[test]
fn buffers_changed_in_flight_never_cause_a_later_mismatch() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    const LEN: usize = 1 << 20;
    const BUF: u64 = 2 * MIB;
    const SPAN: u64 = 6 * MIB;
    let disk = Disk::new(8 * MIB, 4096);
    let mut d = disk.serve(&[]);
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("connect");
    // Every pass of the scribbler changes every byte.
    let noise: Vec<Vec<u8>> = (1..=4u8).map(|s| vec![s * 0x11; LEN]).collect();
    for round in 0..24u64 {
        let offset = round * MIB % SPAN;
        for (ty, buf) in [
            (VIRTIO_BLK_T_OUT, Desc::rd(BUF, LEN as u32)),
            (VIRTIO_BLK_T_IN, Desc::wr(BUF, LEN as u32)),
        ] {
            let stop = AtomicBool::new(false);
            let st = thread::scope(|s| {
                let m = &f.mem;
                // The guest rewrites the buffer for as long as the request
                // is in flight: under a write, or into its own read buffer.
                s.spawn(|| {
                    let mut i = 0;
                    while !stop.load(Ordering::Acquire) {
                        m.write(BUF, &noise[i % noise.len()]);
                        i += 1;
                    }
                });
                m.header(hdr(0), ty, offset / 512);
                m.write(status(0), &[0xff]);
                let vq = &mut f.vqs[0];
                let h = vq.set_chain(m, 0, &[Desc::rd(hdr(0), 16), buf, Desc::wr(status(0), 1)]);
                vq.publish(m, &[h]);
                vq.kick();
                let got = vq.wait_used(m, 1);
                stop.store(true, Ordering::Release);
                assert_eq!(got[0].id, u32::from(h));
                m.read(status(0), 1)[0]
            });
            assert_eq!(st, VIRTIO_BLK_S_OK, "round {round}, type {ty}");
        }
    }
    // Whatever mix of buffer contents each write took, it verifies: now,
    // after an orderly stop (`check`), and after a restart.
    let read_all = |f: &mut Front| {
        for off in (0..SPAN).step_by(256 << 10) {
            let (st, _) = f.read(0, off, 256 << 10);
            assert_eq!(st, VIRTIO_BLK_S_OK, "read at {off}");
        }
    };
    read_all(&mut f);
    drop(f);
    assert_alive(&mut d);
    assert!(d.terminate().success());
    let o = disk.check(&[]);
    assert!(
        o.status.success(),
        "check: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let _d = disk.serve(&[]);
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("connect");
    read_all(&mut f);
}
