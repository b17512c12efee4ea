//! Guest tests: a Linux guest in QEMU (TCG) uses a disk served by
//! `twinsum serve` over vhost-user, the way a real VM would. The guest image
//! comes from `images/build.sh`; the scripts each test runs inside the guest
//! are `images/guest/tests/NAME.sh`, chosen by `twinsum.test=NAME` on the
//! kernel command line. The harness reads the outcome from the serial console.
//!
//! Skipped (with a message) only when qemu-system-x86_64 is not installed.
//! `TWINSUM_GUEST_BACKEND=qsd` runs them against qemu-storage-daemon instead,
//! which skips the checks that only twinsum can pass (checksum mismatch,
//! synchronous mode, clean metadata).

mod guest_support;

use guest_support::{mentions_number, twinsum_block_size, Session};

/// A log line saying twinsum switched to synchronous metadata mode
/// ("entered synchronous metadata mode", "...: metadata is now written
/// synchronously"), not an error about failing to.
fn enters_sync_mode(line: &str) -> bool {
    let line = line.to_ascii_lowercase();
    !line.contains("cannot")
        && (line.contains("entered synchronous") || line.contains("written synchronously"))
}

/// A log line saying twinsum left synchronous mode (device started again).
fn leaves_sync_mode(line: &str) -> bool {
    let line = line.to_ascii_lowercase();
    !line.contains("cannot")
        && (line.contains("left synchronous") || line.contains("leaving synchronous"))
}

#[test]
fn guest_reads_back_a_pattern_from_both_queues() {
    let Some(mut s) = Session::start("pattern") else {
        return;
    };
    s.boot("pattern", false);
    s.expect_pass_and_poweroff("pattern");
    s.stop_and_verify_metadata();
}

#[test]
fn guest_ext4_filesystem_passes_fsck() {
    let Some(mut s) = Session::start("fs") else {
        return;
    };
    s.boot("fs", false);
    s.expect_pass_and_poweroff("fs");
    s.stop_and_verify_metadata();
    // The host's own fsck reads IMG as twinsum left it on disk.
    let fsck = s.host_fsck();
    s.check(fsck);
}

#[test]
fn guest_fio_verify_workload_passes() {
    let Some(mut s) = Session::start("fio") else {
        return;
    };
    s.boot("fio", false);
    s.expect_pass_and_poweroff("fio");
    s.stop_and_verify_metadata();
}

#[test]
fn guest_gets_io_error_for_corrupted_block_only() {
    let Some(s) = Session::start("corrupt") else {
        return;
    };
    corrupted_chunk_fails_alone(s);
}

#[test]
fn guest_gets_io_error_for_corrupted_block_with_512_byte_blocks() {
    let Some(s) = Session::start_with_block_size("corrupt-512", 512) else {
        return;
    };
    corrupted_chunk_fails_alone(s);
}

/// The guest writes 64 chunks of 4 KiB, the host damages a byte of one, and
/// only that chunk fails to read; twinsum logs the block that holds the
/// byte (one 4 KiB chunk spans eight blocks when they are 512 bytes).
fn corrupted_chunk_fails_alone(mut s: Session) {
    s.boot("corrupt", false);
    // The guest wrote and flushed 64 chunks of 4 KiB at the start of the
    // disk; damage one byte inside chunk 37.
    let chunk: u64 = 37;
    let offset = chunk * 4096 + 1234;
    s.wait_marker("WAIT corrupt");
    s.check(s.backend.corrupt_byte(offset));
    let expect = if s.backend.is_twinsum() {
        "error"
    } else {
        "ok"
    };
    s.reply("corrupt", &format!("{chunk} {expect}"));
    s.expect_pass_and_poweroff("corrupt");

    if !s.backend.is_twinsum() {
        eprintln!("note: qemu-storage-daemon cannot detect corruption; mismatch log not checked");
        return;
    }
    let block_size = s.check(twinsum_block_size(&s.backend.meta));
    let block = offset / block_size;
    s.wait_log_line(
        &format!("'checksum mismatch' naming block {block}"),
        0,
        |l| l.contains("checksum mismatch") && mentions_number(l, block),
    );
    let log = s.backend.log();
    let wrong: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("checksum mismatch") && !mentions_number(l, block))
        .collect();
    if !wrong.is_empty() {
        s.fail(format!(
            "mismatch logged for blocks other than {block}: {wrong:?}"
        ));
    }
}

#[test]
fn guest_poweroff_makes_metadata_synchronous_and_next_boot_reads_back() {
    let Some(mut s) = Session::start("poweroff") else {
        return;
    };
    // First QEMU: unflushed O_DIRECT writes, then `poweroff -f`.
    s.boot("persist-write", false);
    // The driver started the device before the test began; a switch to
    // synchronous mode logged from here on is due to the power-off.
    let started = s.backend.log().len();
    s.expect_pass_and_poweroff("persist-write");
    if s.backend.is_twinsum() {
        s.wait_log_line("entering synchronous mode", started, enters_sync_mode);
    }
    if !s.backend.is_running() {
        s.fail("the backend exited when the guest powered off");
    }

    // Second QEMU against the same daemon: the data is still there.
    s.boot("persist-read", false);
    s.expect_pass_and_poweroff("persist-read");

    s.stop_and_verify_metadata();
}

#[test]
fn guest_reboot_resets_device_and_twinsum_leaves_synchronous_mode() {
    let Some(mut s) = Session::start("reboot") else {
        return;
    };
    // Without -no-reboot, the guest's `reboot -f` resets the machine and
    // QEMU stops and restarts the device; the same command line boots again.
    s.boot("reboot", true);
    let started = s.backend.log().len();
    s.wait_marker("REBOOTING");
    let entered = if s.backend.is_twinsum() {
        s.wait_log_line("entering synchronous mode", started, enters_sync_mode)
    } else {
        0
    };
    s.wait_marker("BOOT test=reboot");
    s.wait_marker("SECOND-BOOT ok");
    if s.backend.is_twinsum() {
        s.wait_log_line(
            "leaving synchronous mode after the reboot",
            entered,
            leaves_sync_mode,
        );
    }
    s.wait_marker("WAIT poweroff");
    s.reply("poweroff", "now");
    s.expect_pass_and_poweroff("reboot");
    if !s.backend.is_running() {
        s.fail("the backend exited after the guest's reboot and power-off");
    }
    s.stop_and_verify_metadata();
}

/// Power-cut seeds of the crash test, and after how many fsynced files each
/// cuts: a different moment of the workload every time.
const CRASH_RUNS: [(u64, u32); 3] = [(1, 6), (2, 11), (3, 17)];

#[test]
fn guest_ext4_survives_power_cuts_with_every_fsynced_file_intact() {
    let mut unsynced = 0;
    for (seed, files) in CRASH_RUNS {
        let name = format!("crash-{seed}");
        let seed_arg = seed.to_string();
        let args = ["--volatile-cache", "--power-cut-seed", &seed_arg];
        let Some(s) = Session::start_with(&name, 4096, &args) else {
            return;
        };
        if !s.backend.is_twinsum() {
            eprintln!("note: the power-cut test needs twinsum --volatile-cache; skipped");
            return;
        }
        unsynced += power_cut_mid_workload(s, seed, files);
    }
    // Any one cut may find the cache just flushed; all of them would mean
    // the workload never had writes in flight and the test proved little.
    assert!(unsynced > 0, "no power cut found un-synced data to lose");
}

/// One run of the crash test (images/guest/tests/crash-*.sh): an fsync
/// workload on ext4, a power cut in the middle of it, QEMU killed, and a
/// second boot that checks the filesystem and every fsynced file. Returns
/// how many un-synced data blocks the cut found.
fn power_cut_mid_workload(mut s: Session, seed: u64, files: u32) -> u64 {
    let started = std::time::Instant::now();
    s.boot("crash-write", false);
    s.wait_marker("WAIT crash");
    s.reply("crash", &files.to_string());
    s.wait_marker("CUT-NOW");
    let signalled = s.backend.signal(libc::SIGUSR2);
    s.check(signalled);
    let cut = s.wait_log_line("the power cut", 0, |l| l.contains("power cut #1: "));
    s.kill_guest();
    let fsynced = s.markers("FSYNCED");
    if fsynced.len() < files as usize {
        s.fail(format!(
            "only {} FSYNCED markers before the cut, asked for {files}",
            fsynced.len()
        ));
    }

    s.boot("crash-check", false);
    s.expect_pass_and_poweroff("crash-check");
    let present = s.markers("FILE");
    for f in &fsynced {
        if !present.contains(f) {
            s.fail(format!(
                "file fsynced before the power cut is missing or changed: {f} \
                 (the second boot has {} files)",
                present.len()
            ));
        }
    }
    let log = s.backend.log();
    if log.contains("checksum mismatch") {
        s.fail("twinsum logged a checksum mismatch after the power cut");
    }
    let cut_line = log[..cut].lines().last().unwrap_or_default().to_owned();
    s.stop_and_verify_metadata();
    eprintln!(
        "seed {seed}: {} files fsynced before the cut, {} files after it, {:.1} s; {}",
        fsynced.len(),
        present.len(),
        started.elapsed().as_secs_f64(),
        cut_line.split("] ").nth(1).unwrap_or(&cut_line)
    );
    unsynced_data_blocks(&cut_line)
}

/// N of "kept K of N un-synced ... (data)" in a power cut log line.
fn unsynced_data_blocks(cut_line: &str) -> u64 {
    cut_line
        .split(" of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no un-synced count in {cut_line:?}"))
}

/// Restart twinsum under a running guest (QEMU `reconnect=1`): kill -9
/// three times at seeded random moments of a write/read-back workload,
/// then SIGTERM once (an upgrade). The guest must finish with every fio
/// verify passing, every unflushed O_DIRECT write read back, and no I/O
/// error in its kernel log; each new twinsum must have replayed its
/// predecessor's stage and seen QEMU reconnect.
#[test]
fn guest_keeps_running_while_twinsum_is_killed_and_restarted() {
    let Some(mut s) = Session::start("restart") else {
        return;
    };
    if !s.backend.is_twinsum() {
        eprintln!("note: the restart test needs twinsum's stage; skipped");
        return;
    }
    const ROUNDS: u32 = 8;
    // (round, signal): three kills, then an orderly restart.
    let plan = [
        (2, libc::SIGKILL),
        (4, libc::SIGKILL),
        (5, libc::SIGKILL),
        (7, libc::SIGTERM),
    ];
    let seed = std::env::var("TWINSUM_RESTART_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("restart test: seed {seed} (the moments again: TWINSUM_RESTART_SEED={seed})");
    let mut rng = seed | 1;
    let mut next = || {
        // xorshift: a moment within the round, not synchronisation.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    s.boot_reconnecting("restart");
    s.wait_marker("WAIT restart");
    s.reply("restart", &ROUNDS.to_string());
    let mut replayed = 0u64;
    for round in 1..=ROUNDS {
        s.wait_marker(&format!("ROUND {round}"));
        let Some(&(_, sig)) = plan.iter().find(|(r, _)| *r == round) else {
            continue;
        };
        let delay = std::time::Duration::from_millis(next() % 1500);
        std::thread::sleep(delay);
        let status = s.backend.restart(sig);
        let status = s.check(status);
        eprintln!(
            "round {round}: {} twinsum {delay:?} into the round ({status})",
            if sig == libc::SIGKILL {
                "killed"
            } else {
                "stopped"
            }
        );
        if sig == libc::SIGTERM && !status.success() {
            s.fail(format!("twinsum exited with {status} after SIGTERM"));
        }
        let log = s.backend.log();
        if let Some(line) = log.lines().find(|l| l.contains("replayed")) {
            eprintln!("  {}", line.split("] ").nth(1).unwrap_or(line));
            replayed += 1;
        }
        // QEMU reconnects within a second or so and restarts the rings.
        s.wait_log_line("QEMU to reconnect", 0, |l| {
            l.contains("front-end connected")
        });
    }
    s.expect_pass_and_poweroff("restart");
    let log = s.backend.log();
    if log.contains("checksum mismatch") {
        s.fail("twinsum logged a checksum mismatch");
    }
    s.stop_and_verify_metadata();
    eprintln!("restart test: {replayed} of 3 kills left writes in the stage to replay");
}
