//! `twinsum status`: ask a running serve how it is doing, through its
//! control socket; print a table, the JSON reply, or Prometheus text.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use twinsum::control::protocol::Request;
use twinsum::control::{Client, Status};
use twinsum::integrity::scrub::ScrubState;

/// Arguments of `twinsum status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The control socket of `twinsum serve --control PATH`.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Print the daemon's JSON reply (one object).
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Print the Prometheus text exposition format (for a node-exporter
    /// textfile or a scrape proxy).
    #[arg(long)]
    prometheus: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let status: Status = Client::connect(&args.control)?
        .call(&Request::Status)
        .with_context(|| format!("status from {}", args.control.display()))?;
    let text = if args.json {
        serde_json::to_string(&status)? + "\n"
    } else if args.prometheus {
        prometheus(&status)
    } else {
        table(&status)
    };
    io::stdout().lock().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A short aligned table for people.
fn table(s: &Status) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        (
            "front-end",
            format!(
                "{} ({} queue{})",
                if s.frontend_connected {
                    "connected"
                } else {
                    "not connected"
                },
                s.queues,
                if s.queues == 1 { "" } else { "s" }
            ),
        ),
        (
            "disk",
            format!(
                "{} blocks of {} bytes{}",
                s.blocks,
                s.block_size,
                if s.readonly { ", read-only" } else { "" }
            ),
        ),
        ("uptime", format!("{} s", s.uptime_s)),
        ("reads", s.reads.to_string()),
        ("writes", s.writes.to_string()),
        ("flushes", s.flushes.to_string()),
        (
            "mismatches",
            match s.mismatched_blocks.as_slice() {
                [] => s.mismatches.to_string(),
                recent => format!(
                    "{} (latest: block {})",
                    s.mismatches,
                    recent
                        .iter()
                        .take(8)
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        ),
        ("pending", format!("{} blocks", s.pending)),
        ("queued", format!("{} writes", s.queued)),
        (
            "data syncs",
            format!("{} ({} ms)", s.data_syncs, s.data_sync_ms),
        ),
        (
            "meta syncs",
            format!("{} ({} ms)", s.meta_syncs, s.meta_sync_ms),
        ),
        ("commit rounds", s.commit_rounds.to_string()),
        ("sync mode", yes_no(s.sync_mode).into()),
        ("clean", yes_no(s.clean).into()),
    ];
    if let Some(n) = s.power_cuts {
        rows.push(("power cuts", n.to_string()));
    }
    rows.push((
        "scrub",
        match &s.scrub {
            None => "never run".into(),
            Some(sc) => {
                let mut t = format!(
                    "#{} {} {:.1}%, {} MiB read, {} mismatched",
                    sc.id,
                    state_name(sc.state),
                    sc.percent,
                    sc.bytes_read >> 20,
                    sc.mismatch_count
                );
                if let Some(e) = &sc.error {
                    let _ = write!(t, ": {e}");
                }
                t
            }
        },
    ));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:width$}  {v}\n"))
        .collect()
}

pub(super) fn state_name(s: ScrubState) -> &'static str {
    match s {
        ScrubState::Running => "running",
        ScrubState::Done => "done",
        ScrubState::Stopped => "stopped",
        ScrubState::Failed => "failed",
    }
}

/// The Prometheus text exposition format, version 0.0.4.
fn prometheus(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = write!(
            out,
            "# HELP twinsum_{name} {help}\n# TYPE twinsum_{name} {kind}\ntwinsum_{name} {value}\n"
        );
    };
    let flag = |b: bool| u8::from(b).to_string();
    let counters = [
        ("reads_total", "Guest read requests.", s.reads),
        (
            "writes_total",
            "Guest writes committed out of the write-back stage.",
            s.writes,
        ),
        ("flushes_total", "Guest flush requests.", s.flushes),
        (
            "mismatches_total",
            "Blocks found matching neither checksum (guest reads and scrubs).",
            s.mismatches,
        ),
        (
            "data_syncs_total",
            "Syncs of the data device.",
            s.data_syncs,
        ),
        (
            "meta_syncs_total",
            "Syncs of the metadata device.",
            s.meta_syncs,
        ),
        (
            "commit_rounds_total",
            "Commit rounds of the write-back stage.",
            s.commit_rounds,
        ),
    ];
    for (name, help, v) in counters {
        metric(name, "counter", help, v.to_string());
    }
    metric(
        "data_sync_seconds_total",
        "counter",
        "Time spent in data syncs.",
        format!("{:.3}", s.data_sync_ms as f64 / 1000.0),
    );
    metric(
        "meta_sync_seconds_total",
        "counter",
        "Time spent in metadata syncs.",
        format!("{:.3}", s.meta_sync_ms as f64 / 1000.0),
    );
    if let Some(n) = s.power_cuts {
        metric(
            "power_cuts_total",
            "counter",
            "Simulated power cuts (--volatile-cache).",
            n.to_string(),
        );
    }
    let gauges = [
        (
            "pending_blocks",
            "Blocks written since the last data sync.",
            s.pending.to_string(),
        ),
        (
            "queued_writes",
            "Completed writes still in the write-back stage.",
            s.queued.to_string(),
        ),
        (
            "sync_mode",
            "1 while every write completes with its metadata durable.",
            flag(s.sync_mode),
        ),
        (
            "clean",
            "1 while the stored superblock says clean.",
            flag(s.clean),
        ),
        (
            "frontend_connected",
            "1 while a vhost-user front-end is connected.",
            flag(s.frontend_connected),
        ),
        ("queues", "Virtqueues offered.", s.queues.to_string()),
        ("readonly", "1 for a read-only disk.", flag(s.readonly)),
        ("blocks", "Blocks of the disk.", s.blocks.to_string()),
        (
            "block_size_bytes",
            "Logical block size.",
            s.block_size.to_string(),
        ),
        (
            "uptime_seconds",
            "Seconds since the control socket began to serve.",
            s.uptime_s.to_string(),
        ),
    ];
    for (name, help, v) in gauges {
        metric(name, "gauge", help, v);
    }
    let sc = s.scrub.as_ref();
    metric(
        "scrub_running",
        "gauge",
        "1 while a scrub runs.",
        flag(sc.is_some_and(|x| x.state == ScrubState::Running)),
    );
    metric(
        "scrub_progress_ratio",
        "gauge",
        "Part of the disk behind the current or last scrub (0 to 1).",
        format!(
            "{:.4}",
            sc.map_or(0.0, |x| x.position as f64 / x.blocks.max(1) as f64)
        ),
    );
    metric(
        "scrub_bytes_read",
        "gauge",
        "Bytes the current or last scrub read.",
        sc.map_or(0, |x| x.bytes_read).to_string(),
    );
    metric(
        "scrub_mismatches",
        "gauge",
        "Mismatched blocks the current or last scrub found.",
        sc.map_or(0, |x| x.mismatch_count).to_string(),
    );
    let _ = write!(
        out,
        "# HELP twinsum_info The twinsum version serving.\n# TYPE twinsum_info gauge\ntwinsum_info{{version=\"{}\"}} 1\n",
        s.version.replace('\\', "\\\\").replace('"', "\\\"")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "uptime_s": 5, "frontend_connected": true,
            "queues": 2, "readonly": false, "sync_mode": false, "clean": false,
            "block_size": 4096, "blocks": 1024, "reads": 10, "writes": 20,
            "flushes": 3, "mismatches": 2, "mismatched_blocks": [9, 4],
            "pending": 1, "queued": 0, "data_syncs": 4, "meta_syncs": 5,
            "data_sync_ms": 1500, "meta_sync_ms": 2, "commit_rounds": 6,
            "power_cuts": null,
            "scrub": {"id": 1, "state": "running", "rate_mib": 64, "percent": 50.0,
                      "position": 512, "blocks": 1024, "bytes_read": 2097152,
                      "elapsed_ms": 100, "mismatch_count": 1, "error": null}
        }))
        .unwrap()
    }

    #[test]
    fn the_table_is_aligned_and_names_the_latest_mismatches() {
        let t = table(&status());
        // "commit rounds" is the longest key: values start two past it.
        for l in t.lines() {
            assert_eq!(&l[13..15], "  ", "{l:?}");
            assert_ne!(&l[15..16], " ", "{l:?}");
        }
        assert!(t.contains("mismatches     2 (latest: block 9, 4)"), "{t}");
        assert!(
            t.contains("scrub          #1 running 50.0%, 2 MiB read, 1 mismatched"),
            "{t}"
        );
    }

    #[test]
    fn prometheus_text_has_help_type_and_a_sample_for_each_metric() {
        let p = prometheus(&status());
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines.len() % 3, 0);
        for m in lines.chunks(3) {
            let name = m[0].split(' ').nth(2).unwrap();
            assert!(name.starts_with("twinsum_"), "{name}");
            let kind = m[1].rsplit(' ').next().unwrap();
            assert_eq!(m[1], format!("# TYPE {name} {kind}"));
            assert!(kind == "counter" || kind == "gauge");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
            assert!(m[2].starts_with(name));
            let value = m[2].rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{}", m[2]);
        }
        assert!(p.contains("\ntwinsum_reads_total 10\n"));
        assert!(p.contains("\ntwinsum_data_sync_seconds_total 1.500\n"));
        assert!(p.contains("\ntwinsum_scrub_progress_ratio 0.5000\n"));
        assert!(!p.contains("power_cuts"), "only with --volatile-cache");
    }
}
