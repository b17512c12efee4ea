//! The reference: what a block may hold after a crash, and what a read of
//! it must do. [`BlockModel`] serves the sequential cases (one submitter,
//! so every write has a place in one order); [`History`] the concurrent
//! ones, judged from logical issue and completion times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::support::{tag, Content, SECTOR};

/// What the guest may see of one block.
#[derive(Clone)]
pub struct BlockModel {
    /// The content at the last completed flush, or the survivor of the last
    /// crash.
    pub durable: Content,
    /// Whether `durable` must verify. A torn survivor of a crash was never
    /// written by anyone and must keep failing to read until overwritten.
    pub durable_ok: bool,
    /// Every content written since `durable`, completed or in flight: a
    /// crash may leave any of them.
    pub since: Vec<Content>,
    /// What a read returns now.
    pub current: Content,
    pub current_ok: bool,
}

impl BlockModel {
    pub fn new(zeros: &Content) -> Self {
        Self {
            durable: zeros.clone(),
            durable_ok: true,
            since: Vec::new(),
            current: zeros.clone(),
            current_ok: true,
        }
    }

    /// A write (or zeroing) of `c` was issued.
    pub fn written(&mut self, c: &Content) {
        self.since.push(c.clone());
        self.current = c.clone();
        self.current_ok = true;
    }

    /// A completed flush (or sync-mode write) made `current` durable.
    pub fn made_durable(&mut self) {
        self.durable = self.current.clone();
        self.durable_ok = self.current_ok;
        self.since.clear();
    }

    /// `s` survived a crash: it is the only content of the block now.
    pub fn survived(&mut self, s: &[u8], ok: bool) {
        let s: Content = s.into();
        self.durable = s.clone();
        self.durable_ok = ok;
        self.since.clear();
        self.current = s;
        self.current_ok = ok;
    }

    /// `s` is a content that must verify.
    pub fn legit(&self, s: &[u8]) -> bool {
        self.since.iter().any(|c| **c == *s) || (self.durable_ok && *self.durable == *s)
    }

    /// Every sector of `s` comes from some content the block legitimately
    /// had (so a mismatch of `s` is a tear, not invented data).
    pub fn sectors_known(&self, s: &[u8]) -> bool {
        s.chunks(SECTOR).enumerate().all(|(i, sec)| {
            let range = i * SECTOR..(i + 1) * SECTOR;
            std::iter::once(&self.durable)
                .chain(&self.since)
                .any(|c| c[range.clone()] == *sec)
        })
    }

    /// Name each sector of `s` after the content it came from, for messages.
    pub fn describe_sectors(&self, s: &[u8]) -> String {
        let parts: Vec<String> = s
            .chunks(SECTOR)
            .enumerate()
            .map(|(i, sec)| {
                let range = i * SECTOR..(i + 1) * SECTOR;
                std::iter::once(&self.durable)
                    .chain(&self.since)
                    .find(|c| c[range.clone()] == *sec)
                    .map_or("unknown".to_string(), |c| tag(c))
            })
            .collect();
        format!("[{}]", parts.join(" | "))
    }
}

/// One write (or zeroing) of one block by a concurrent submitter.
pub struct WriteRec {
    pub block: u64,
    pub content: Content,
    /// Logical time the batch was submitted; writes of one batch get
    /// consecutive ticks in op order.
    pub issue: u64,
    /// Logical time the batch returned, if it completed before the power
    /// failed.
    pub complete: Option<u64>,
    pub batch: u64,
}

/// A flush that completed: it covers every write completed before `start`
/// and every write of its own batch.
pub struct FlushRec {
    pub start: u64,
    pub batch: u64,
}

/// What the concurrent submitters of one round did, in logical time.
#[derive(Default)]
pub struct History {
    clock: AtomicU64,
    pub next_batch: AtomicU64,
    pub writes: Mutex<Vec<WriteRec>>,
    pub flushes: Mutex<Vec<FlushRec>>,
}

impl History {
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
}

/// `later` superseded `earlier` (same block): it was issued after
/// `earlier` completed, or after it in the same batch (the engine keeps
/// the order of one batch's updates to a block).
fn supersedes(later: &WriteRec, earlier: &WriteRec) -> bool {
    (later.batch == earlier.batch && later.issue > earlier.issue)
        || earlier.complete.is_some_and(|c| later.issue > c)
}

fn covered(w: &WriteRec, flushes: &[FlushRec]) -> bool {
    flushes
        .iter()
        .any(|f| f.batch == w.batch || w.complete.is_some_and(|c| c < f.start))
}

/// What a crash may have left of one block, from a round's history.
pub struct Possible<'h> {
    /// The block's writes in the round.
    mine: Vec<&'h WriteRec>,
    flushes: &'h [FlushRec],
    /// The round's starting content and whether it verifies.
    start: &'h (Content, bool),
}

/// How a survivor stands against [`Possible`].
pub struct Verdict {
    /// A content that must verify.
    pub legit: bool,
    /// The damaged start content, still there: must keep failing.
    pub damaged: bool,
    /// Every sector comes from a possible content (a tear, not invented
    /// data).
    pub known: bool,
}

impl<'h> Possible<'h> {
    pub fn new(
        block: u64,
        writes: &'h [WriteRec],
        flushes: &'h [FlushRec],
        start: &'h (Content, bool),
    ) -> Self {
        Self {
            mine: writes.iter().filter(|w| w.block == block).collect(),
            flushes,
            start,
        }
    }

    /// A content is still possible unless a later write superseded it and
    /// a completed flush covered that later write.
    fn live(&self, w: &WriteRec) -> bool {
        !self
            .mine
            .iter()
            .any(|l| supersedes(l, w) && covered(l, self.flushes))
    }

    fn start_live(&self) -> bool {
        !self.mine.iter().any(|l| covered(l, self.flushes))
    }

    pub fn judge(&self, s: &[u8]) -> Verdict {
        let start_live = self.start_live();
        let (s0, s0_ok) = self.start;
        let legit = self.mine.iter().any(|w| self.live(w) && *w.content == *s)
            || (start_live && *s0_ok && **s0 == *s);
        let damaged = !legit && start_live && **s0 == *s;
        let mut candidates: Vec<&Content> = self
            .mine
            .iter()
            .filter(|w| self.live(w))
            .map(|w| &w.content)
            .collect();
        if start_live {
            candidates.push(s0);
        }
        let known = s.chunks(SECTOR).enumerate().all(|(i, sec)| {
            candidates
                .iter()
                .any(|c| c[i * SECTOR..(i + 1) * SECTOR] == *sec)
        });
        Verdict {
            legit,
            damaged,
            known,
        }
    }

    /// The block's round, for messages.
    pub fn describe(&self) -> String {
        let (s0, s0_ok) = self.start;
        let w: Vec<String> = self
            .mine
            .iter()
            .map(|w| {
                format!(
                    "{}@{}..{}{}",
                    tag(&w.content),
                    w.issue,
                    w.complete.map_or("inflight".into(), |c| c.to_string()),
                    if self.live(w) {
                        ""
                    } else {
                        " superseded+flushed"
                    }
                )
            })
            .collect();
        let f: Vec<String> = self
            .flushes
            .iter()
            .map(|f| format!("flush@{}", f.start))
            .collect();
        format!(
            "start {}{}; writes [{}]; {}",
            tag(s0),
            if *s0_ok { "" } else { " (damaged)" },
            w.join(", "),
            f.join(" ")
        )
    }
}
