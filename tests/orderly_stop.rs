//! An orderly stop (SIGTERM) with requests in flight: every request the
//! daemon took is completed on the ring before the front-end sees the
//! socket close, and nothing is written to the ring after that.
//!
//! QEMU reconnects a vhost-user-blk disk by resuming the rings at the used
//! index it read when the old backend went away; a completion written
//! after that runs the request a second time on the new backend, over
//! descriptors the guest may have reused, and the guest's driver gives up
//! on the queue (the restart guest test hung this way).
//!
//! The front-end is tests/common/frontend.rs, which can read the used ring
//! at any moment, as QEMU does.

mod common {
    pub mod content;
    pub mod disk;
    pub mod frontend;
    pub mod run;
}

use std::os::fd::AsRawFd;

use common::content::pattern;
use common::disk::Disk;
use common::frontend::*;
use common::run::poll;

const MIB: u64 = 1 << 20;
const WRITE: usize = 64 << 10;

/// Whether the daemon has closed its end of `f`'s socket.
fn hung_up(f: &Front) -> bool {
    let mut p = libc::pollfd {
        fd: f.sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, its count passed alongside.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents & (libc::POLLHUP | libc::POLLERR) != 0
        || (p.revents & libc::POLLIN != 0 && {
            let mut b = [0u8; 1];
            // SAFETY: reads at most one byte into a live buffer.
            let n = unsafe {
                libc::recv(
                    p.fd,
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            n == 0
        })
}

#[test]
fn sigterm_completes_every_request_taken_before_it_hangs_up() {
    let disk = Disk::new(16 * MIB, 4096);
    let mut d = disk.serve(&[]);
    let opts = Options {
        queue_size: MAX_QUEUE_SIZE,
        ..Options::default()
    };
    let mut f = Front::connect(&disk.socket, &opts).expect("connect");

    // Rounds of four 64 KiB writes and a FLUSH: every FLUSH syncs the data
    // file, so the batch takes long enough that SIGTERM finds most of it
    // still running once the first completion shows.
    const ROUNDS: u64 = 16;
    let mut heads = Vec::new();
    let mut expect = Vec::new();
    {
        let m = &f.mem;
        let vq = &mut f.vqs[0];
        let mut desc = 0u16;
        let mut k = 0u64;
        for r in 0..ROUNDS {
            for w in 0..4 {
                let offset = (r * 4 + w) * WRITE as u64;
                let bytes = pattern(offset, WRITE, 0x5709);
                m.header(hdr(k), VIRTIO_BLK_T_OUT, offset / 512);
                m.write(data(k), &bytes);
                m.write(status(k), &[0xff]);
                heads.push(vq.set_chain(
                    m,
                    desc,
                    &[
                        Desc::rd(hdr(k), 16),
                        Desc::rd(data(k), WRITE as u32),
                        Desc::wr(status(k), 1),
                    ],
                ));
                expect.push((k, Some((offset, bytes))));
                desc += 3;
                k += 1;
            }
            m.header(hdr(k), VIRTIO_BLK_T_FLUSH, 0);
            m.write(status(k), &[0xff]);
            heads.push(vq.set_chain(m, desc, &[Desc::rd(hdr(k), 16), Desc::wr(status(k), 1)]));
            expect.push((k, None));
            desc += 2;
            k += 1;
        }
        // All of it in one avail update: the worker takes the whole batch
        // in one pass.
        vq.publish(m, &heads);
        vq.kick();
    }
    let n = heads.len() as u16;
    poll("the first completion", || {
        (f.vqs[0].used_idx(&f.mem) > 0).then_some(())
    });
    d.signal(libc::SIGTERM);
    poll("the daemon to close the socket", || {
        hung_up(&f).then_some(())
    });
    let at_hang_up = f.vqs[0].used_idx(&f.mem);
    let exit = d.wait_exit();
    assert!(exit.success(), "SIGTERM exit: {exit}\n{}", d.log());
    let at_exit = f.vqs[0].used_idx(&f.mem);
    assert_eq!(
        at_exit, at_hang_up,
        "the daemon completed requests after it closed the socket"
    );
    assert_eq!(
        at_hang_up, n,
        "every request of the batch the worker took is completed before the socket closes"
    );
    for (k, _) in &expect {
        assert_eq!(f.mem.read(status(*k), 1)[0], VIRTIO_BLK_S_OK, "request {k}");
    }
    drop(f);
    let check = disk.check(&[]);
    assert!(
        check.status.success(),
        "check after the orderly stop: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // And what completed is on the disk.
    let _d = disk.serve(&[]);
    let mut f = Front::connect(&disk.socket, &Options::default()).expect("reconnect");
    for (_, w) in expect {
        if let Some((offset, bytes)) = w {
            assert_eq!(
                f.read(0, offset, WRITE),
                (VIRTIO_BLK_S_OK, bytes),
                "at {offset}"
            );
        }
    }
}
