//! Every crash state of a run (issue 14): an ext4 workload with fsyncs
//! runs once in a guest on `twinsum serve --log-writes`; `crash-states`
//! then makes states cut right after flushes, at the marks the host put
//! into the log (`twinsum mark`) after each fsync the guest reported, and
//! at random instants, each with a random subset of the later writes
//! kept, dropped or torn. For
//! each: `twinsum check` is clean, e2fsck replays the journal and then
//! `e2fsck -fn` is clean, and every file fsynced before the cut has its
//! content (read from the host with debugfs). A state made illegal on
//! purpose — the blocks of an fsynced file put back as they were before
//! the run, as if the writes a completed flush covered were dropped — is
//! caught.
//!
//! Skipped (with a message) when QEMU, e2fsck or debugfs is missing.

// The harness is shared with tests/guest.rs; this test uses part of it.
#[allow(dead_code)]
mod guest_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_support::{run_twinsum, Session};

const FILES: usize = 10;

fn sbin(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Run a host tool; `(exit code, stdout, stderr)`.
fn run(program: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Put mark `name` into the log through the control socket; its position.
fn mark(control: &Path, name: &str) -> Result<u64, String> {
    let out = run_twinsum(&["mark", "--control", s(control), name, "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    v["mark"]["position"]
        .as_u64()
        .ok_or_else(|| format!("no position in {out}"))
}

/// A file fsynced in the guest: its md5, and a log position by which the
/// fsync had completed (the mark the host made once it saw the guest's
/// FSYNCED line).
struct Fsynced {
    name: String,
    md5: String,
    by: u64,
}

/// What the checks of one state found wrong, if anything.
fn check_state(
    tools: &Tools,
    img: &Path,
    meta: &Path,
    cut: u64,
    files: &[Fsynced],
) -> Result<usize, String> {
    if let Err(e) = run_twinsum(&["check", "--data", s(img), "--meta", s(meta), "--json"]) {
        return Err(format!("twinsum check: {e}"));
    }
    // Journal replay (what a mount does), then a full read-only check.
    let (rc, out, err) = run(&tools.e2fsck, &["-E", "journal_only", "-y", s(img)]);
    if rc > 1 {
        return Err(format!("e2fsck journal replay exited {rc}: {out}{err}"));
    }
    let (rc, out, err) = run(&tools.e2fsck, &["-fn", s(img)]);
    if rc != 0 {
        return Err(format!("e2fsck -fn exited {rc}: {out}{err}"));
    }
    let mut checked = 0;
    for f in files.iter().filter(|f| f.by <= cut) {
        let cmd = format!(
            "{} -R 'cat /files/{}' {} 2>/dev/null | md5sum",
            tools.debugfs.display(),
            f.name,
            s(img)
        );
        let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
        let md5 = String::from_utf8_lossy(&out.stdout);
        if md5.split_whitespace().next() != Some(f.md5.as_str()) {
            return Err(format!(
                "{} was fsynced by entry {} but has md5 {} in a state cut at {cut}, not {}",
                f.name,
                f.by,
                md5.trim(),
                f.md5
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

struct Tools {
    e2fsck: PathBuf,
    debugfs: PathBuf,
}

#[test]
fn guest_ext4_every_crash_state_of_a_recorded_run_is_consistent() {
    let (Some(e2fsck), Some(debugfs), Some(mkfs)) =
        (sbin("e2fsck"), sbin("debugfs"), sbin("mkfs.ext4"))
    else {
        eprintln!(
            "SKIPPED crash-states guest test: e2fsprogs (e2fsck, debugfs, mkfs.ext4) missing"
        );
        return;
    };
    let tools = Tools { e2fsck, debugfs };
    let dir = tempfile::Builder::new()
        .prefix("twinsum-crash-states-")
        .tempdir()
        .unwrap();
    let d = dir.path().to_owned();
    let log = d.join("run.log");
    let control = d.join("control.sock");
    let (base, base_meta) = (d.join("base.img"), d.join("base.meta"));
    // ext4 made on the host and formatted over, so that every instant of
    // the log holds a filesystem; then the base copies, as the README says.
    let prepare = {
        let (base, base_meta) = (base.clone(), base_meta.clone());
        Box::new(move |img: &Path, meta: &Path| -> Result<(), String> {
            let (rc, out, err) = run(
                &mkfs,
                &[
                    "-F",
                    "-q",
                    "-b",
                    "4096",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    s(img),
                ],
            );
            if rc != 0 {
                return Err(format!("mkfs.ext4: {out}{err}"));
            }
            run_twinsum(&[
                "format",
                "--data",
                s(img),
                "--meta",
                s(meta),
                "--block-size",
                "4096",
                "--force",
            ])?;
            for (from, to) in [(img, &base), (meta, &base_meta)] {
                let st = Command::new("cp")
                    .args(["--sparse=always", s(from), s(to)])
                    .status()
                    .map_err(|e| e.to_string())?;
                if !st.success() {
                    return Err(format!("cp {} failed", from.display()));
                }
            }
            Ok(())
        })
    };
    let serve_args = ["--log-writes", s(&log), "--control", s(&control)];
    let Some(mut sess) = Session::start_prepared("crash-states", 4096, &serve_args, prepare) else {
        return;
    };
    if !sess.backend.is_twinsum() {
        eprintln!("note: the crash-states test needs twinsum --log-writes; skipped");
        return;
    }

    // The one recorded run.
    sess.boot("logged-write", false);
    sess.wait_marker("WAIT logged");
    sess.reply("logged", &FILES.to_string());
    let mut files = Vec::new();
    for i in 0..FILES {
        sess.wait_marker("WAIT next");
        let m = sess.markers("FSYNCED");
        let Some(line) = m.get(i) else {
            sess.fail(format!("no FSYNCED marker for file {i}"));
        };
        let mut w = line.split_whitespace();
        let (name, md5) = (w.next().unwrap().to_owned(), w.next().unwrap().to_owned());
        let by = mark(&control, &format!("fsynced-{name}")).unwrap_or_else(|e| sess.fail(e));
        files.push(Fsynced { name, md5, by });
        sess.reply("next", "");
    }
    sess.wait_marker("WRITTEN");
    sess.kill_guest();
    sess.stop_and_verify_metadata();

    let info: serde_json::Value =
        serde_json::from_str(&run_twinsum(&["log-info", s(&log), "--json"]).unwrap()).unwrap();
    eprintln!("log: {info}");
    assert!(info["flushes"].as_u64().unwrap() >= FILES as u64, "{info}");
    assert_eq!(info["stops"], 1, "{info}");
    assert_eq!(info["marks"].as_array().unwrap().len(), FILES, "{info}");

    // The states: right after flushes, at the marks, at random instants.
    let mut states = 0;
    let mut file_checks = 0;
    let mut kept_dropped_torn = [0u64; 3];
    for (at, count) in [("flushes", "12"), ("marks", "10"), ("random", "14")] {
        let out = d.join(at);
        let manifest = run_twinsum(&[
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
            at,
            "--count",
            count,
            "--seed",
            "14",
            "--json",
        ])
        .unwrap_or_else(|e| sess.fail(e));
        let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        let on_disk: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m, on_disk, "--json prints manifest.json");
        for st in m["states"].as_array().unwrap() {
            let img = out.join(st["image"].as_str().unwrap());
            let meta = out.join(st["meta"].as_str().unwrap());
            let cut = st["cut"].as_u64().unwrap();
            assert_eq!(st["at"], at);
            if at == "marks" {
                // A mark's state has at least the file it was made for.
                let name = st["mark"].as_str().unwrap().trim_start_matches("fsynced-");
                assert!(files.iter().any(|f| f.name == name && f.by == cut), "{st}");
            }
            for (k, key) in ["kept", "dropped", "torn"].iter().enumerate() {
                kept_dropped_torn[k] += st[key].as_u64().unwrap();
            }
            match check_state(&tools, &img, &meta, cut, &files) {
                Ok(n) => file_checks += n,
                Err(e) => sess.fail(format!("{at} state {} (cut at {cut}): {e}", img.display())),
            }
            states += 1;
            // Only what the next state needs stays on disk.
            let _ = fs::remove_file(&img);
            let _ = fs::remove_file(&meta);
        }
    }
    eprintln!(
        "{states} crash states consistent, {file_checks} fsynced files found intact; \
         un-synced writes kept/dropped/torn: {kept_dropped_torn:?}"
    );
    assert!(states >= 30, "only {states} states");
    assert!(file_checks >= states, "few file checks: {file_checks}");
    assert!(
        kept_dropped_torn[1] > 0 && kept_dropped_torn[2] > 0,
        "no state dropped or tore a write: {kept_dropped_torn:?}"
    );

    // The control: a state with a flushed write dropped must be caught.
    illegal_state_is_caught(&sess, &tools, &d, &log, &base, &base_meta, &files);
}

/// Build the last flushes state again, then put the blocks of the last
/// file fsynced before its cut back to what the base held: the writes a
/// completed flush covered, dropped.
fn illegal_state_is_caught(
    sess: &Session,
    tools: &Tools,
    d: &Path,
    log: &Path,
    base: &Path,
    base_meta: &Path,
    files: &[Fsynced],
) {
    let out = d.join("illegal");
    let manifest = run_twinsum(&[
        "crash-states",
        "--log",
        s(log),
        "--base",
        s(base),
        "--base-meta",
        s(base_meta),
        "--out",
        s(&out),
        "--at",
        "flushes",
        "--count",
        "1",
        "--seed",
        "1",
        "--json",
    ])
    .unwrap_or_else(|e| sess.fail(e));
    let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let st = &m["states"][0];
    let img = out.join(st["image"].as_str().unwrap());
    let meta = out.join(st["meta"].as_str().unwrap());
    let cut = st["cut"].as_u64().unwrap();
    assert!(
        check_state(tools, &img, &meta, cut, files).is_ok(),
        "the state is legal before it is broken"
    );
    // Rebuild it (the check above replayed the journal into it).
    run_twinsum(&[
        "crash-states",
        "--log",
        s(log),
        "--base",
        s(base),
        "--base-meta",
        s(base_meta),
        "--out",
        s(&out),
        "--at",
        "flushes",
        "--count",
        "1",
        "--seed",
        "1",
    ])
    .unwrap_or_else(|e| sess.fail(e));
    let victim = files
        .iter()
        .rfind(|f| f.by <= cut)
        .expect("a file fsynced by the end");
    // Where the file's data lives: ask a journal-replayed scratch copy
    // (the file's inode may still be only in the journal).
    let scratch = d.join("scratch.img");
    assert!(Command::new("cp")
        .args(["--sparse=always", s(&img), s(&scratch)])
        .status()
        .unwrap()
        .success());
    run(&tools.e2fsck, &["-E", "journal_only", "-y", s(&scratch)]);
    let (_, blocks, _) = run(
        &tools.debugfs,
        &["-R", &format!("blocks /files/{}", victim.name), s(&scratch)],
    );
    let _ = fs::remove_file(&scratch);
    let blocks: Vec<u64> = blocks
        .split_whitespace()
        .filter_map(|b| b.parse().ok())
        .collect();
    assert!(
        !blocks.is_empty(),
        "debugfs found no blocks of {}",
        victim.name
    );
    {
        use std::os::unix::fs::FileExt;
        let src = fs::File::open(base).unwrap();
        let dst = fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut buf = vec![0u8; 4096];
        for b in &blocks {
            src.read_exact_at(&mut buf, b * 4096).unwrap();
            dst.write_all_at(&buf, b * 4096).unwrap();
        }
    }
    match check_state(tools, &img, &meta, cut, files) {
        Ok(_) => sess.fail(format!(
            "a state with the flushed blocks {blocks:?} of {} dropped passed every check",
            victim.name
        )),
        Err(e) => eprintln!("the illegal state is caught: {e}"),
    }
}
