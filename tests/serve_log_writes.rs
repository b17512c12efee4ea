//! `serve --log-writes`, `log-info` and `crash-states` over the real socket
//! (libblkio as the front-end): a recorded run that survives a kill -9 and
//! a restart, states that check clean and hold every flushed write, and
//! the one-line refusals (a wrong base, a log of another disk).

mod common {
    pub mod client;
    pub mod content;
    pub mod disk;
    pub mod run;
}

use std::fs;
use std::path::Path;

use blkio::ReqFlags;
use common::client::{Client, Errno, Queue};
use common::content::pattern;
use common::disk::{twinsum, Daemon, Disk};
use common::run::s;

const MIB: u64 = 1 << 20;

/// The request only this test issues.
impl Queue<'_> {
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.q.write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete()
    }
}

fn copy(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .args(["--sparse=always", s(from), s(to)])
        .status()
        .expect("cp");
    assert!(st.success());
}

fn log_info(log: &Path) -> serde_json::Value {
    let o = twinsum(&["log-info", s(log), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_recorded_run_gives_crash_states_that_check_clean_and_keep_flushed_writes() {
    let d = Disk::new(16 * MIB, 4096);
    let (base, base_meta, log) = (d.path("base.img"), d.path("base.meta"), d.path("run.log"));
    copy(&d.data, &base);
    copy(&d.meta, &base_meta);

    // First process: writes and flushes, each followed by a mark made
    // through the control socket, a zeroing, then an orderly stop.
    let control = d.path("control.sock");
    let daemon = d.serve(&["--log-writes", s(&log), "--control", s(&control)]);
    let mut flushed = Vec::new();
    let mut marks = Vec::new();
    {
        let mut c = Client::connect(&daemon.socket, 2);
        let mut q = c.q0();
        for i in 0..6u64 {
            let (off, len) = (i * 3 * MIB / 2, 64 << 10);
            q.write(off, &pattern(off, len, i)).unwrap();
            q.flush().unwrap();
            flushed.push((off, pattern(off, len, i)));
            let o = twinsum(&[
                "mark",
                "--control",
                s(&control),
                &format!("flushed-{i}"),
                "--json",
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(m["mark"]["name"], format!("flushed-{i}"));
            marks.push(m["mark"]["position"].as_u64().unwrap());
        }
        // Refused, with one line: a name too long.
        let o = twinsum(&["mark", "--control", s(&control), &"x".repeat(256)]);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("1 to 255 bytes"), "{err}");
        q.write_zeroes(12 * MIB, MIB).unwrap();
        q.write(13 * MIB, &pattern(13 * MIB, 8192, 99)).unwrap();
        // Logging changes nothing the guest reads.
        assert_eq!(q.read(0, 64 << 10).unwrap(), pattern(0, 64 << 10, 0));
    }
    assert!(daemon.terminate().success());
    let info = log_info(&log);
    assert_eq!(
        (info["starts"].as_u64(), info["stops"].as_u64()),
        (Some(1), Some(1))
    );
    let logged: Vec<u64> = info["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["position"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, marks);
    assert!(info["writes"].as_u64().unwrap() >= 7, "{info}");
    assert!(info["flushes"].as_u64().unwrap() >= 6, "{info}");
    assert!(info["zeroes"].as_u64().unwrap() >= 1, "{info}");
    assert!(info["data"]["syncs"].as_u64().unwrap() >= 6, "{info}");

    // Without --log-writes there is nothing to mark.
    let plain = d.serve(&["--control", s(&control)]);
    let o = twinsum(&["mark", "--control", s(&control), "nothing"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("without --log-writes"));
    assert!(plain.terminate().success());

    // Second process, killed: the log is appended to and stays readable.
    let daemon = d.serve(&["--log-writes", s(&log)]);
    {
        let mut c = Client::connect(&daemon.socket, 1);
        let mut q = c.q0();
        let off = 14 * MIB;
        q.write(off, &pattern(off, 4096, 7)).unwrap();
        q.flush().unwrap();
        flushed.push((off, pattern(off, 4096, 7)));
        q.write(off + MIB, &pattern(off + MIB, 4096, 8)).unwrap();
    }
    daemon.signal(libc::SIGKILL);
    drop(daemon);
    let info = log_info(&log);
    assert_eq!(
        (info["starts"].as_u64(), info["stops"].as_u64()),
        (Some(2), Some(1))
    );
    // A third one replays the dead one's stage and stops cleanly.
    assert!(d.serve(&["--log-writes", s(&log)]).terminate().success());
    assert_eq!(log_info(&log)["starts"], 3);
    assert!(d.check(&[]).status.success());

    let out = d.path("states");
    let o = twinsum(&[
        "crash-states",
        "--log",
        s(&log),
        "--base",
        s(&base),
        "--base-meta",
        s(&base_meta),
        "--out",
        s(&out),
        "--at",
        "flushes",
        "--seed",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let states = m["states"].as_array().unwrap();
    assert!(states.len() >= 7, "{m}");
    assert_eq!(m["metadata"], "device");
    for st in states {
        let img = out.join(st["image"].as_str().unwrap());
        let meta = out.join(st["meta"].as_str().unwrap());
        let c = twinsum(&["check", "--data", s(&img), "--meta", s(&meta), "--json"]);
        assert!(
            c.status.success(),
            "{st}: {}",
            String::from_utf8_lossy(&c.stdout)
        );
        assert_eq!(st["broken_promises"], serde_json::json!([]));
    }
    // The last state is after every flush: each flushed write is there.
    let last = out.join(states.last().unwrap()["image"].as_str().unwrap());
    let bytes = fs::read(&last).unwrap();
    for (off, data) in &flushed {
        let at = *off as usize;
        assert!(
            bytes[at..at + data.len()] == data[..],
            "flushed write at {off}"
        );
    }

    // A state at each mark, holding every write flushed before it.
    let out = d.path("marks");
    let o = twinsum(&[
        "crash-states",
        "--log",
        s(&log),
        "--base",
        s(&base),
        "--base-meta",
        s(&base_meta),
        "--out",
        s(&out),
        "--at",
        "marks",
        "--seed",
        "4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let states = m["states"].as_array().unwrap();
    assert_eq!(states.len(), 6);
    for (i, st) in states.iter().enumerate() {
        assert_eq!(st["mark"], format!("flushed-{i}"));
        assert_eq!(st["cut"].as_u64(), Some(marks[i]));
        let bytes = fs::read(out.join(st["image"].as_str().unwrap())).unwrap();
        for (off, data) in &flushed[..=i] {
            let at = *off as usize;
            assert!(
                bytes[at..at + data.len()] == data[..],
                "mark {i}: write at {off}"
            );
        }
    }

    // A wrong base: the metadata as it is now.
    let o = twinsum(&[
        "crash-states",
        "--log",
        s(&log),
        "--base",
        s(&base),
        "--base-meta",
        s(&d.meta),
        "--out",
        s(&d.path("wrong")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("is not the metadata this log began with"),
        "{err}"
    );
    // The image as it is now, with the right metadata.
    let o = twinsum(&[
        "crash-states",
        "--log",
        s(&log),
        "--base",
        s(&d.data),
        "--base-meta",
        s(&base_meta),
        "--out",
        s(&d.path("wrong")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not match the base metadata"), "{err}");

    // The log of this disk refused for another.
    let other = Disk::new(16 * MIB, 4096);
    let mut daemon = Daemon::spawn(&other, &other.socket, &["--log-writes", s(&log)]);
    let st = daemon.wait_exit();
    assert_eq!(st.code(), Some(2));
    assert!(
        daemon.log().contains("was started on another disk"),
        "{}",
        daemon.log()
    );
}
