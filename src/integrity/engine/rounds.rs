//! Committing updates: a batch is split into rounds in which no block
//! repeats; each round sets its new checksums, makes them durable with one
//! metadata sync (shared with every thread committing at that moment), and
//! only then moves the data.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use log::error;

use super::{Core, EngineError};
use crate::integrity::gate::Ticket;
use crate::integrity::hash::ZERO;
use crate::intmap::IntMap;
use crate::meta::log::{LogWrite, Reserve};
use crate::meta::Pair;

/// How a round's new pairs become durable.
enum Commit {
    /// Version 1 metadata: its dirty pages are written; a metadata sync
    /// satisfying this ticket makes them durable.
    Sync(Ticket),
    /// A log record to write durably, in sequence order.
    Log(LogWrite),
    /// Too many pairs for one record, or the log is full: a checkpoint.
    Checkpoint,
}

/// Log records are written in sequence order, one after another.
#[derive(Debug, Default)]
pub(super) struct LogOrder {
    /// Sequence number of the next record to write.
    pub next: u64,
    /// A record could not be written: later ones must not count until a
    /// checkpoint moves replay past it.
    pub broken: bool,
}

/// A checkpoint carries a block's extra versions into the log only while
/// they take at most this share of it; beyond, it syncs the data.
const CARRY_SHARE: u64 = 4;

/// A DISCARD of a huge range is committed in chunks of this many blocks, so
/// the Pending set and the dirty pages stay bounded.
pub(super) const ZERO_CHUNK: u64 = 1 << 16;

/// Where the new content of an update comes from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source<'a> {
    /// Memory the caller owns.
    Mem(&'a [u8]),
    /// A complete record of the write-back stage.
    Staged { offset: u64, len: usize },
    /// The range becomes zeros.
    Zero,
}

/// One block-range update of a write batch.
pub(super) struct Update<'a> {
    /// Index of the op in the caller's batch.
    pub op: usize,
    pub block: u64,
    pub count: u64,
    pub source: Source<'a>,
    /// Checksum per block (ZERO for zeroed blocks).
    pub sums: Vec<u64>,
}

impl Update<'_> {
    pub fn is_zero(&self) -> bool {
        matches!(self.source, Source::Zero)
    }
}

impl Core {
    /// Route a batch's updates: writes into the write-back stage (when it
    /// is in use and the write fits), everything else committed directly.
    pub(super) fn write_updates(
        &self,
        mut updates: Vec<Update<'_>>,
        results: &mut [Result<(), EngineError>],
    ) {
        // Hash before taking any lock: the data is ours and does not change.
        for u in &mut updates {
            u.sums = match u.source {
                Source::Mem(d) => self.sums_of(u.block, d),
                Source::Zero => vec![ZERO; u.count as usize],
                Source::Staged { .. } => std::mem::take(&mut u.sums),
            };
        }
        let Some(wb) = self.wb.as_ref().filter(|_| !self.sync_mode()) else {
            self.drain();
            self.write_rounds(updates, results);
            return;
        };
        // Writes join the stage in order; a zeroing (or a write too large
        // for the stage) waits for what queued before it, so it cannot be
        // overtaken by an older write.
        let mut direct = Vec::new();
        for u in updates {
            match u.source {
                Source::Mem(data) if wb.fits(data.len()) => {
                    if !direct.is_empty() {
                        self.drain();
                        self.write_rounds(std::mem::take(&mut direct), results);
                    }
                    if let Err(e) = self.enqueue(wb, u.block, u.count, data, u.sums) {
                        results[u.op] = Err(e);
                    }
                }
                _ => direct.push(u),
            }
        }
        wb.kick();
        if !direct.is_empty() {
            self.drain();
            self.write_rounds(direct, results);
        }
    }

    /// Commit `updates` round by round; each failure goes to the ops of
    /// its round.
    pub(super) fn write_rounds(
        &self,
        updates: Vec<Update<'_>>,
        results: &mut [Result<(), EngineError>],
    ) {
        for round in split_rounds(updates) {
            if let Err(e) = self.write_round(&round) {
                for u in &round {
                    if results[u.op].is_ok() {
                        results[u.op] = Err(e.clone());
                    }
                }
            }
        }
    }

    /// Commit and write one round: no block appears twice in it.
    fn write_round(&self, round: &[Update<'_>]) -> Result<(), EngineError> {
        let mut st = self.make_writable(round)?;
        self.counters.rounds.fetch_add(1, Ordering::Relaxed);

        // The blocks are Clean (or zero) now: old covers the durable content.
        st.events += 1;
        let mut entries = Vec::with_capacity(round.iter().map(|u| u.sums.len()).sum());
        // Rewrites of Pending blocks: their new pairs drop a version the
        // media may hold, which only their log record names. They reach
        // the cache (whose pages may be written back at any moment) only
        // once that record is durable.
        let mut deferred = Vec::new();
        // A table page that cannot be read, or written back to make room,
        // stops this part-way: the round then fails as a whole below, and
        // `complete` unmarks what was marked.
        let marked = (|| -> Result<(), EngineError> {
            for u in round {
                if u.is_zero() {
                    st.zeroing.push((u.block, u.block + u.count));
                }
                for (i, &sum) in u.sums.iter().enumerate() {
                    let b = u.block + i as u64;
                    let p = st.meta.get(b)?;
                    let pending = st.pending.contains_key(&b);
                    if sum == ZERO && p == Pair::default() && !pending {
                        // Reads as zeros already, whatever the punch does.
                        continue;
                    }
                    let pair = if pending {
                        // make_writable let a Pending block through: the log
                        // carries its versions (format version 3).
                        let pair = st.rewrite_pending(b, p, sum);
                        deferred.push((b, pair));
                        pair
                    } else {
                        let pair = Pair {
                            new: sum,
                            old: p.old,
                        };
                        st.meta.set(b, pair)?;
                        pair
                    };
                    st.log_entries(b, pair, &mut entries);
                    let e = st.pending.entry(b).or_insert(super::pairs::PendingBlock {
                        inflight: 0,
                        completed: 0,
                    });
                    e.inflight += 1;
                }
            }
            Ok(())
        })();
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
        let commit = marked.and_then(|()| self.commit_locked(&mut st, &entries));
        drop(st);
        let mut result = commit.and_then(|c| self.finish_commit(c, &entries, &deferred));

        // Only now may the data move: its checksum is durable. A round
        // that never got that far failed as a whole: its new checksums
        // name content that never reached the disk, so no data sync may
        // make them the only ones (`complete` takes its blocks out of the
        // Pending set; the next write resolves their pairs).
        let mut failed = vec![result.is_err(); round.len()];
        if result.is_ok() {
            for (u, failed) in round.iter().zip(&mut failed) {
                if let Err(e) = self.write_data(u) {
                    error!(
                        "data write of blocks {}+{} failed: {e}; their checksums still cover the old and the new content",
                        u.block, u.count
                    );
                    *failed = true;
                    result = Err(EngineError::io("writing data")(e));
                }
            }
        }
        self.complete(round, &failed);
        self.counters
            .writes
            .fetch_add(round.len() as u64, Ordering::Relaxed);
        result?;

        if self.sync_mode() {
            self.settle_issued()?;
        } else if self.lock().pending.len() > self.opts.pending_limit {
            // Bound the window of weakened detection for guests that never
            // flush.
            self.flush_data()?;
        }
        Ok(())
    }

    fn write_data(&self, u: &Update<'_>) -> io::Result<()> {
        let at = self.offset(u.block);
        match u.source {
            Source::Mem(d) => self.data.write_at(d, at),
            Source::Zero => self.data.zero_range(at, self.offset(u.count)),
            Source::Staged { offset, len } => match &self.wb {
                Some(wb) => wb.with_data(offset, len, &mut |d| self.data.write_at(d, at)),
                None => Err(io::Error::other("a staged write without a stage")),
            },
        }
    }

    /// Start making a round's new pairs (`entries`) durable, under the
    /// state lock: reserve their log record, or (version 1 metadata) write
    /// every dirty page now, so page writes land in the order pairs
    /// changed.
    fn commit_locked(
        &self,
        st: &mut super::State,
        entries: &[(u64, Pair)],
    ) -> Result<Commit, EngineError> {
        Ok(match st.meta.log_reserve(entries) {
            None => {
                st.meta.write_dirty()?;
                Commit::Sync(self.meta_gate.ticket())
            }
            Some(Reserve::Write(w)) => Commit::Log(w),
            Some(Reserve::Full | Reserve::TooLarge) => Commit::Checkpoint,
        })
    }

    /// Finish what `commit_locked` started, outside the state lock; when it
    /// returns the round's pairs are durable (`deferred` ones set in the
    /// cache too) and its data may move.
    fn finish_commit(
        &self,
        c: Commit,
        entries: &[(u64, Pair)],
        deferred: &[(u64, Pair)],
    ) -> Result<(), EngineError> {
        match c {
            Commit::Sync(ticket) => self.sync_meta(ticket),
            Commit::Log(w) => {
                self.write_log(w, entries, deferred)?;
                let half_full = self
                    .lock()
                    .meta
                    .log_usage()
                    .is_some_and(|(used, size)| used > size / 2);
                if half_full {
                    // Keep room, without stalling this round: records wait
                    // for space only in a burst.
                    self.request_checkpoint();
                }
                Ok(())
            }
            Commit::Checkpoint => self.commit_by_checkpoint(entries, deferred),
        }
    }

    /// Commit a round (its log `entries`) by checkpoint: its pairs go to
    /// the table; `deferred` ones then wait for a record of their own.
    fn commit_by_checkpoint(
        &self,
        entries: &[(u64, Pair)],
        deferred: &[(u64, Pair)],
    ) -> Result<(), EngineError> {
        self.checkpoint()?;
        if deferred.is_empty() {
            return Ok(());
        }
        self.record_again(entries, deferred)
    }

    /// Set `deferred` pairs once a record after the last checkpoint's
    /// mark names the versions they drop, which the media may still hold:
    /// the round's record again, in the log the checkpoint emptied or
    /// passed over. Only if that fails does a data sync come first, after
    /// which the media hold none of those versions. (A data sync was the
    /// rule before: on a 1 TiB disk under random writes it stalled the
    /// commit thread for the half minute such a sync takes.)
    fn record_again(
        &self,
        entries: &[(u64, Pair)],
        deferred: &[(u64, Pair)],
    ) -> Result<(), EngineError> {
        let reserved = self.lock().meta.log_reserve(entries);
        if let Some(Reserve::Write(w)) = reserved {
            match self.write_record(&w) {
                // Unless yet another checkpoint passed over it.
                Ok(()) => {
                    if self.set_deferred(&w, deferred)? {
                        return Ok(());
                    }
                }
                Err(Some(e)) => log::error!(
                    "writing metadata log record {} failed: {e}; syncing the data instead",
                    w.seq
                ),
                Err(None) => {}
            }
        }
        log::debug!(
            "a round's rewritten pairs wait for a data sync: no record names their versions"
        );
        self.flush_data()?;
        set_pairs(&mut self.lock(), deferred)?;
        self.checkpoint()
    }

    /// Write a log record durably, after every record before it: replay
    /// stops at the first missing one, so a record may only count once
    /// all earlier ones are on the device. If it cannot be written, a
    /// checkpoint commits its round instead.
    fn write_log(
        &self,
        w: LogWrite,
        entries: &[(u64, Pair)],
        deferred: &[(u64, Pair)],
    ) -> Result<(), EngineError> {
        match self.write_record(&w) {
            Ok(()) => {
                if self.set_deferred(&w, deferred)? {
                    return Ok(());
                }
                // A checkpoint begun since the record was reserved moved
                // replay past it. The table it wrote holds the round's
                // other pairs, but not the deferred ones.
                self.record_again(entries, deferred)
            }
            Err(e) => {
                if let Some(e) = e {
                    log::error!(
                        "writing metadata log record {} failed: {e}; committing by checkpoint instead",
                        w.seq
                    );
                }
                // The pairs are in memory: a checkpoint writes them to the
                // table and moves replay past every record, written or not.
                self.commit_by_checkpoint(entries, deferred)
            }
        }
    }

    /// Once record `w` is durable: set its round's `deferred` pairs,
    /// unless a checkpoint begun since passed over the record (`false`:
    /// they need a record after that checkpoint's mark). Without any,
    /// nothing waits for the record, and the state lock is not taken.
    fn set_deferred(&self, w: &LogWrite, deferred: &[(u64, Pair)]) -> Result<bool, EngineError> {
        if deferred.is_empty() {
            return Ok(true);
        }
        let mut st = self.lock();
        if w.seq < st.checkpoint_seq {
            return Ok(false);
        }
        set_pairs(&mut st, deferred)?;
        Ok(true)
    }

    /// Write record `w` in sequence order. `Err(Some)`: its write failed;
    /// `Err(None)`: an earlier one did, so it was not written. Either
    /// way no later record is written until a checkpoint moves replay
    /// past them.
    fn write_record(&self, w: &LogWrite) -> Result<(), Option<std::io::Error>> {
        let mut order = self
            .log_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if w.seq < order.next {
            // A checkpoint moved replay past it already.
            return Ok(());
        }
        while order.next < w.seq && !order.broken {
            order = self
                .log_turn
                .wait(order)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let r = if order.broken {
            Err(None)
        } else {
            self.counters.meta_syncs.fetch_add(1, Ordering::Relaxed);
            super::Counters::timed(&self.counters.meta_sync_us, || {
                self.meta_dev.write_durable(&w.bytes, w.offset)
            })
            .map_err(Some)
        };
        match &r {
            Ok(()) => order.next = w.seq + 1,
            Err(_) => order.broken = true,
        }
        drop(order);
        self.log_turn.notify_all();
        r
    }

    /// Ask the checkpoint thread for a checkpoint soon.
    fn request_checkpoint(&self) {
        self.ckpt.ask();
    }

    /// The checkpoint thread: one checkpoint per request, until stopped.
    pub(super) fn run_checkpointer(&self) {
        while self.ckpt.wait() {
            if let Err(e) = self.checkpoint() {
                log::error!(
                    "metadata checkpoint failed: {}; rounds commit by checkpoint until one succeeds",
                    crate::error::Chain(&e)
                );
            }
        }
    }

    /// Write every dirty table page, sync the metadata, and (with a log)
    /// move the start of replay to the records taken after the pages were
    /// written: the log is empty again.
    pub(super) fn checkpoint(&self) -> Result<(), EngineError> {
        let _one = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let broken = self
            .log_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .broken;
        let (mark, ticket, carry, mut sync_data) = {
            let mut st = self.lock();
            let mark = st.meta.checkpoint_begin()?;
            if let Some(m) = mark {
                st.checkpoint_seq = m.seq;
            }
            let (carry, sync_data) = if st.extras.is_empty() {
                (None, false)
            } else {
                // Records before the mark name versions beyond the pairs
                // the table holds. Carry them into the first record after
                // the mark; if they are too many, or records cannot be
                // written, sync the data instead: each of those versions
                // was followed by a completed write before its record was
                // made (make_writable waits for writes in flight), so a
                // sync that begins now leaves each block with a content
                // its pair names.
                let entries = st.carried()?;
                let small = st.meta.log_usage().is_some_and(|(_, size)| {
                    (entries.len() * crate::meta::log::ENTRY) as u64 <= size / CARRY_SHARE
                });
                match (broken || !small, mark.is_some()) {
                    (false, true) => match st.meta.log_reserve(&entries) {
                        Some(Reserve::Write(w)) => (Some(w), false),
                        _ => (None, true),
                    },
                    _ => (None, true),
                }
            };
            (mark, self.meta_gate.ticket(), carry, sync_data)
        };
        if let Some(w) = carry {
            if let Err(e) = self.write_record(&w) {
                if let Some(e) = e {
                    log::error!(
                        "writing metadata log record {} (the versions a checkpoint carries) failed: {e}; syncing the data instead",
                        w.seq
                    );
                }
                sync_data = true;
            }
        }
        if sync_data {
            log::debug!("checkpoint syncs the data: records before it named versions");
            self.flush_data()?;
        }
        self.sync_meta(ticket)?;
        if let Some(mark) = mark {
            let mut st = self.lock();
            let sb = st.meta.checkpoint_superblock(mark);
            self.store_superblock(&mut st, sb)?;
            st.meta.checkpoint_done(mark);
            drop(st);
            let mut order = self
                .log_order
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if order.broken && mark.seq > order.next {
                // Every record after the one that failed is behind replay
                // now; later ones may be written again.
                order.broken = false;
                order.next = mark.seq;
            }
            drop(order);
            self.log_turn.notify_all();
        }
        Ok(())
    }

    pub(super) fn sync_meta(&self, ticket: Ticket) -> Result<(), EngineError> {
        self.meta_gate
            .sync_after(ticket, || {
                self.counters.meta_syncs.fetch_add(1, Ordering::Relaxed);
                super::Counters::timed(&self.counters.meta_sync_us, || self.meta_dev.sync())
            })
            .map_err(EngineError::meta_io("syncing metadata"))
    }
}

fn set_pairs(st: &mut super::State, pairs: &[(u64, Pair)]) -> Result<(), EngineError> {
    for &(b, pair) in pairs {
        st.meta.set(b, pair)?;
    }
    Ok(())
}

/// Split a batch into rounds in which no block repeats, keeping the order
/// of updates that touch the same block (a later write must land later),
/// and no round covers much more than [`ZERO_CHUNK`] blocks.
///
/// Batches from the write-back stage hold thousands of updates, so small
/// updates are placed through a per-block map (linear); the few large
/// ranges (zeroings) are kept as intervals.
pub(super) fn split_rounds(updates: Vec<Update<'_>>) -> Vec<Vec<Update<'_>>> {
    const SMALL: u64 = 64;
    let mut rounds: Vec<(u64, Vec<Update<'_>>)> = Vec::new();
    // The last round each block of a small update went to.
    let mut small: IntMap<usize> = IntMap::default();
    let mut large: Vec<(u64, u64, usize)> = Vec::new();
    for u in updates {
        let end = u.block + u.count;
        let after_large = large
            .iter()
            .filter(|&&(b, e, _)| b < end && u.block < e)
            .map(|&(_, _, r)| r + 1)
            .max();
        let after_small = if u.count <= small.len() as u64 {
            (u.block..end)
                .filter_map(|b| small.get(&b))
                .map(|&r| r + 1)
                .max()
        } else {
            small
                .iter()
                .filter(|(&b, _)| u.block <= b && b < end)
                .map(|(_, &r)| r + 1)
                .max()
        };
        let mut round = after_large.max(after_small).unwrap_or(0);
        while rounds
            .get(round)
            .is_some_and(|(n, r)| !r.is_empty() && n + u.count > ZERO_CHUNK)
        {
            round += 1;
        }
        if u.count <= SMALL {
            for b in u.block..end {
                small.insert(b, round);
            }
        } else {
            large.push((u.block, end, round));
        }
        if rounds.len() <= round {
            rounds.resize_with(round + 1, || (0, Vec::new()));
        }
        rounds[round].0 += u.count;
        rounds[round].1.push(u);
    }
    rounds.into_iter().map(|(_, r)| r).collect()
}

pub(super) fn zero_chunks<'a>(
    op: usize,
    block: u64,
    count: u64,
) -> impl Iterator<Item = Update<'a>> {
    (0..count.div_ceil(ZERO_CHUNK)).map(move |i| {
        let start = block + i * ZERO_CHUNK;
        Update {
            op,
            block: start,
            count: ZERO_CHUNK.min(block + count - start),
            source: Source::Zero,
            sums: Vec::new(),
        }
    })
}
