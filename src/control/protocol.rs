//! The control protocol: one JSON object per line each way.
//!
//! A request names its command in `cmd`; the reply is `{"ok": true, ...}`
//! or `{"ok": false, "error": "..."}`, and the connection stays usable
//! after either. Replies come in the order of the requests.
//!
//! | request | reply (besides `ok`) |
//! | --- | --- |
//! | `{"cmd":"status"}` | the fields of [`Status`] |
//! | `{"cmd":"scrub","rate_mib":N}` | `scrub`: the [`Progress`] of the scrub it started |
//! | `{"cmd":"scrub-status"}` | `scrub`: the current or last scrub's [`Progress`], or `null` |
//! | `{"cmd":"scrub-stop"}` | `scrub`: the [`Progress`] where it stopped |
//! | `{"cmd":"sync-mode"}` | `sync_mode`, `readonly` |
//! | `{"cmd":"power-cut"}` | `power_cut`: a [`PowerCut`] |
//! | `{"cmd":"mark","name":NAME}` | `mark`: a [`Mark`] |

use serde::{Deserialize, Serialize};

use crate::integrity::scrub::{Progress, ScrubState};

/// Longest request line the server accepts (bytes, without the newline).
pub const MAX_LINE: usize = 64 << 10;
/// Largest `rate_mib` a scrub accepts: 1 TiB/s, far past any disk.
pub const MAX_RATE_MIB: u64 = 1 << 20;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Start a scrub at `rate_mib` MiB/s (default 64; 0 = unlimited).
    Scrub {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate_mib: Option<u64>,
    },
    ScrubStatus,
    ScrubStop,
    SyncMode,
    PowerCut,
    /// Put a named mark into the `--log-writes` log.
    Mark {
        name: String,
    },
}

/// The reply to `mark`: where the mark went in the write log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub name: String,
    /// Its entry number (what `log-info` and `crash-states` call it).
    pub position: u64,
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Seconds since the control socket began to serve.
    pub uptime_s: u64,
    pub frontend_connected: bool,
    pub queues: u16,
    pub readonly: bool,
    pub sync_mode: bool,
    /// The superblock as stored says the disk is clean (no write since the
    /// last orderly stop point).
    pub clean: bool,
    pub block_size: u32,
    pub blocks: u64,
    // The counters below start at zero with each engine: at start, and
    // again after a simulated power cut.
    /// Guest read, write and flush requests; a write counts once it is
    /// committed out of the write-back stage (until then it is `queued`).
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Blocks found matching neither checksum, by guest reads and scrubs.
    pub mismatches: u64,
    /// The most recent of them, newest first (bounded).
    pub mismatched_blocks: Vec<u64>,
    /// Blocks written since the last data sync.
    pub pending: u64,
    /// Completed writes still in the write-back stage.
    pub queued: u64,
    pub data_syncs: u64,
    pub meta_syncs: u64,
    pub data_sync_ms: u64,
    pub meta_sync_ms: u64,
    pub commit_rounds: u64,
    /// With `--volatile-cache`: power cuts so far.
    pub power_cuts: Option<u64>,
    /// The current or last scrub, without its list; `None` before the
    /// first.
    pub scrub: Option<ScrubSummary>,
}

/// A scrub as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScrubSummary {
    pub id: u64,
    pub state: ScrubState,
    pub rate_mib: u64,
    pub percent: f64,
    pub position: u64,
    pub blocks: u64,
    pub bytes_read: u64,
    pub elapsed_ms: u64,
    pub mismatch_count: u64,
    pub error: Option<String>,
}

impl From<&Progress> for ScrubSummary {
    fn from(p: &Progress) -> Self {
        Self {
            id: p.id,
            state: p.state,
            rate_mib: p.rate_mib,
            percent: (p.percent() * 10.0).round() / 10.0,
            position: p.position,
            blocks: p.blocks,
            bytes_read: p.bytes_read,
            elapsed_ms: p.elapsed_ms,
            mismatch_count: p.mismatches.count,
            error: p.error.clone(),
        }
    }
}

/// The reply to `power-cut`: what the cut did (as its log line says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerCut {
    /// 1 for the first cut of this process.
    pub number: u64,
    /// Replays this cut with `serve --power-cut-seed`.
    pub seed: u64,
    /// The data device tears at blocks of this many bytes.
    pub data_unit: u64,
    pub data_kept: u64,
    pub data_unsynced: u64,
    pub meta_kept: u64,
    pub meta_unsynced: u64,
    /// Full destages the cache limit forced since the previous cut.
    pub destages: u64,
}

/// `{"ok": true, ...body}`, `ok` first.
#[derive(Serialize)]
pub(super) struct Ok<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

impl<'a, T: Serialize> Ok<'a, T> {
    pub fn new(body: &'a T) -> Self {
        Self { ok: true, body }
    }
}

/// `{"ok": false, "error": "..."}`.
#[derive(Serialize)]
pub(super) struct Refusal<'a> {
    ok: bool,
    error: &'a str,
}

impl<'a> Refusal<'a> {
    pub fn new(error: &'a str) -> Self {
        Self { ok: false, error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_documented() {
        let parse = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(parse(r#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert_eq!(
            parse(r#"{"cmd":"scrub","rate_mib":8}"#).unwrap(),
            Request::Scrub { rate_mib: Some(8) }
        );
        assert_eq!(
            parse(r#"{"cmd":"scrub"}"#).unwrap(),
            Request::Scrub { rate_mib: None }
        );
        assert_eq!(
            parse(r#"{"cmd":"scrub-stop"}"#).unwrap(),
            Request::ScrubStop
        );
        assert_eq!(parse(r#"{"cmd":"sync-mode"}"#).unwrap(), Request::SyncMode);
        assert_eq!(parse(r#"{"cmd":"power-cut"}"#).unwrap(), Request::PowerCut);
        assert_eq!(
            parse(r#"{"cmd":"mark","name":"commit 17"}"#).unwrap(),
            Request::Mark {
                name: "commit 17".into()
            }
        );
        for bad in [
            r#"{"cmd":"mark"}"#,
            r#"{"cmd":"mark","name":3}"#,
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"scrub","rate_mib":-1}"#,
            r#"{"cmd":"scrub","speed":3}"#,
            r#"{"command":"status"}"#,
            "[1,2]",
            "status",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn replies_put_ok_first() {
        let body = serde_json::json!({"a": 1});
        assert_eq!(
            serde_json::to_string(&Ok::new(&body)).unwrap(),
            r#"{"ok":true,"a":1}"#
        );
        assert_eq!(
            serde_json::to_string(&Refusal::new("no")).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
    }
}
