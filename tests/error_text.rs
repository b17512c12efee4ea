//! The exact text a user sees for the errors they meet most, from the
//! built binary: one `twinsum:` line that says what failed, then each
//! cause once (ARCHITECTURE.md, "Errors"). A change to any of these lines
//! is a change to what users read, so it shows here.

mod common {
    pub mod disk;
    pub mod run;
    pub mod stage;
}

use std::fs::{self, File};
use std::os::unix::net::UnixListener;
use std::process::Output;

use common::disk::{twinsum, Daemon, Disk};
use common::run::s;
use common::stage::craft_stage;
use twinsum::meta::meta_len;

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;

/// The one `twinsum:` line of `output` (a command's stderr or a daemon's
/// log), after checking that no cause in it is printed twice.
fn the_error_line(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("twinsum:"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {output}");
    let line = lines[0];
    // "what failed: cause: its cause": a message repeated by its wrapper
    // (the old `bad superblock: not twinsum metadata (…): not twinsum
    // metadata (…)`) shows as one part twice.
    let parts: Vec<&str> = line.split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "{part:?} is printed twice in {line:?}"
        );
    }
    line.to_string()
}

/// What a refused `twinsum` command printed on stderr, which must be one
/// error line and nothing else, with exit code 2.
fn refusal(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "only the error: {err}");
    the_error_line(&err)
}

/// The error line of a `twinsum serve` on `disk` that must refuse to start.
fn serve_refusal(mut daemon: Daemon) -> String {
    let st = daemon.wait_exit();
    let log = daemon.log();
    assert_eq!(st.code(), Some(2), "{log}");
    the_error_line(&log)
}

#[test]
fn foreign_metadata() {
    let disk = Disk::new(MIB, BS);
    let other = disk.path("other.img");
    File::create(&other)
        .and_then(|f| f.set_len(2 * MIB))
        .expect("other image");
    assert_eq!(
        refusal(twinsum(&[
            "check",
            "--data",
            s(&other),
            "--meta",
            s(&disk.meta)
        ])),
        format!(
            "twinsum: cannot use metadata {} with image {}: metadata belongs to another image: it describes {MIB} bytes, the image has {}",
            disk.meta.display(),
            other.display(),
            2 * MIB
        )
    );
}

#[test]
fn truncated_table() {
    // 16 pages of pairs, then the metadata log; the file ends inside the
    // table, and the line names the whole length, log included.
    let disk = Disk::new(16 * MIB, BS);
    let table_end = meta_len(16 * MIB / BS);
    let need = table_end + disk.info()["log_size"].as_u64().expect("log_size");
    assert_eq!(fs::metadata(&disk.meta).expect("meta").len(), need);
    let cut = table_end - 8 * 4096;
    File::options()
        .write(true)
        .open(&disk.meta)
        .and_then(|f| f.set_len(cut))
        .expect("truncate");
    let want = format!(
        "twinsum: cannot use metadata {}: metadata is truncated: {cut} bytes, it needs {need}",
        disk.meta.display(),
    );
    assert_eq!(refusal(disk.check(&[])), want);
    assert_eq!(refusal(twinsum(&["info", "--meta", s(&disk.meta)])), want);
}

#[test]
fn garbage_metadata() {
    let disk = Disk::new(MIB, BS);
    fs::write(&disk.meta, vec![0xa5u8; 64 * 1024]).expect("garbage");
    let want = format!(
        "twinsum: cannot use metadata {}: bad superblock: not twinsum metadata (magic 0xa5a5a5a5a5a5a5a5)",
        disk.meta.display()
    );
    assert_eq!(refusal(twinsum(&["info", "--meta", s(&disk.meta)])), want);
    assert_eq!(refusal(disk.check(&[])), want);
}

#[test]
fn socket_held_by_a_live_daemon() {
    let disk = Disk::new(MIB, BS);
    let first = disk.serve(&[]);
    // Another disk, the same socket.
    let other = Disk::new(MIB, BS);
    let sock = disk.socket.display();
    assert_eq!(
        serve_refusal(Daemon::spawn(&other, &disk.socket, &[])),
        format!("twinsum: serve on {sock}: {sock} is in use by another twinsum")
    );
    assert!(first.terminate().success(), "the first daemon served on");
}

#[test]
fn socket_held_by_a_live_process() {
    let disk = Disk::new(MIB, BS);
    let busy = disk.path("busy.sock");
    let _listener = UnixListener::bind(&busy).expect("bind");
    let sock = busy.display();
    assert_eq!(
        serve_refusal(Daemon::spawn(&disk, &busy, &[])),
        format!("twinsum: serve on {sock}: {sock} is in use by a live process")
    );
}

#[test]
fn stage_of_other_metadata() {
    let disk = Disk::new(MIB, BS);
    let other = Disk::new(MIB, 512);
    craft_stage(&other, &[(1, vec![7; 4096])]);
    fs::copy(&other.stage, &disk.stage).expect("copy the stage");
    let (mine, theirs) = (disk.info(), other.info());
    assert_eq!(
        serve_refusal(Daemon::spawn(&disk, &disk.socket, &[])),
        format!(
            "twinsum: serve on {}: cannot use the write-back stage {}: the stage belongs to other metadata (salt {}, 2048 blocks of 512 bytes; this metadata has salt {}, 256 blocks of 4096 bytes)",
            disk.socket.display(),
            disk.stage.display(),
            theirs["salt"].as_str().expect("salt"),
            mine["salt"].as_str().expect("salt"),
        )
    );
}
