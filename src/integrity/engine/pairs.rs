//! The Clean/Pending state machine of DESIGN §2.
//!
//! - A write to a Clean block sets `new := c(X)` (old still covers the
//!   durable content) before its data moves ([`super::rounds`]).
//! - A write to a Pending block first syncs the data device, which turns
//!   every Pending block whose writes completed before the sync began into
//!   Clean (`old := new`): [`Core::make_writable`], [`Core::flush_data`].
//! - FLUSH syncs the data device the same way; the forgotten old checksums
//!   reach the metadata device lazily.
//! - A pair with two different slots that is not Pending was left by a
//!   crash (or a failed write): [`Core::resolve`] reads the block to learn
//!   which slot it matches before a new write makes it Pending again.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};

use log::warn;

use super::rounds::Update;
use super::{Core, EngineError};
use crate::intmap::IntMap;
use crate::meta::{MetaError, Metadata, Pair};

/// A block written since the last data sync.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingBlock {
    /// Data writes to it issued and not yet completed.
    pub inflight: u32,
    /// Event number at which its last write completed.
    pub completed: u64,
}

/// What the state lock guards.
pub(super) struct State {
    pub meta: Metadata,
    pub pending: IntMap<PendingBlock>,
    /// Counts write starts and completions, to tell which completed before
    /// a data sync began.
    pub events: u64,
    /// The on-disk superblock says "dirty" already.
    pub marked_dirty: bool,
    /// Zeroings issued and not completed. Their already-zero blocks do not
    /// enter the Pending set (nothing changes for them on a crash), but a
    /// write to such a block must not overtake the hole punch.
    pub zeroing: Vec<(u64, u64)>,
    /// Format version 3: checksums beyond its pair that a Pending block's
    /// data may still hold on the media (versions written since the last
    /// data sync, before the two its pair names). Every log record naming
    /// the block carries them, so the two slots need not cover them.
    pub extras: IntMap<Vec<u64>>,
    /// How many checksums `extras` holds, to bound it.
    pub extra_count: usize,
    /// Where replay starts after the latest checkpoint begun: a record
    /// before it counts only through the table pages that checkpoint
    /// wrote.
    pub checkpoint_seq: u64,
}

/// Most versions a block may have beyond its pair before a rewrite waits
/// for a data sync instead.
const MAX_EXTRAS_PER_BLOCK: usize = 6;
/// Most extra versions held in all, bounding memory and record size.
const MAX_EXTRAS: usize = 1 << 18;

impl State {
    pub fn new(meta: Metadata, marked_dirty: bool) -> Self {
        Self {
            meta,
            pending: IntMap::default(),
            events: 0,
            marked_dirty,
            zeroing: Vec::new(),
            extras: IntMap::default(),
            extra_count: 0,
            checkpoint_seq: 0,
        }
    }

    /// Forget block `b`'s extra versions: its data is durable and known.
    pub fn drop_extras(&mut self, b: u64) {
        if let Some(v) = self.extras.remove(&b) {
            self.extra_count -= v.len();
        }
    }

    /// A rewrite of Pending block `b` (pair `p`) with content of checksum
    /// `sum`, without a data sync first: the media may hold `p.old` (its
    /// content at the last sync), `p.new`, its extra versions, or the new
    /// content. The pair becomes `(sum, p.new)` and `p.old` joins the
    /// extras.
    pub fn rewrite_pending(&mut self, b: u64, p: Pair, sum: u64) -> Pair {
        let ex = self.extras.entry(b).or_default();
        let before = ex.len();
        if !ex.contains(&p.old) {
            ex.push(p.old);
        }
        ex.retain(|&v| v != sum && v != p.new);
        let after = ex.len();
        if after == 0 {
            self.extras.remove(&b);
        }
        self.extra_count = self.extra_count + after - before;
        Pair {
            new: sum,
            old: p.new,
        }
    }

    /// A record naming every block with extra versions, and them, for a
    /// checkpoint to write as the first record it keeps: replay must still
    /// find each block's versions once it starts after the records that
    /// named them. In the order of a round's record: a block's versions,
    /// then its pair.
    pub fn carried(&mut self) -> Result<Vec<(u64, Pair)>, MetaError> {
        let mut blocks: Vec<u64> = self.extras.keys().copied().collect();
        blocks.sort_unstable();
        let mut entries = Vec::with_capacity(blocks.len() + self.extra_count);
        for b in blocks {
            let pair = self.meta.get(b)?;
            self.log_entries(b, pair, &mut entries);
        }
        Ok(entries)
    }

    /// Block `b`'s entries of a log record: its extra versions, if any,
    /// ahead of its pair, which replay takes as the block's last entry.
    pub fn log_entries(&self, b: u64, pair: Pair, entries: &mut Vec<(u64, Pair)>) {
        if let Some(extras) = self.extras.get(&b) {
            entries.extend(extras.iter().map(|&v| (b, Pair { new: v, old: v })));
        }
        entries.push((b, pair));
    }

    /// Whether `round` may rewrite its Pending blocks without a data sync
    /// first: the metadata log carries versions (format version 3), no
    /// block would hold too many, and its record fits in the log now.
    fn may_rewrite(&mut self, round: &[Update<'_>]) -> bool {
        if !self.meta.log_versions() {
            return false;
        }
        let mut entries = 0usize;
        let mut added = 0usize;
        for u in round {
            for b in u.block..u.block + u.count {
                let extras = self.extras.get(&b).map_or(0, Vec::len);
                let pending = self.pending.contains_key(&b);
                if pending && extras >= MAX_EXTRAS_PER_BLOCK {
                    return false;
                }
                added += usize::from(pending);
                entries += 1 + extras + usize::from(pending);
            }
        }
        self.extra_count + added <= MAX_EXTRAS && self.meta.log_has_room(entries)
    }

    /// Block `b`'s last content is durable: it leaves the Pending set and
    /// its old checksum is forgotten (`old := new`).
    fn settle(&mut self, b: u64) {
        self.pending.remove(&b);
        self.drop_extras(b);
        let forgotten = self.meta.get(b).and_then(|p| {
            self.meta.set(
                b,
                Pair {
                    new: p.new,
                    old: p.new,
                },
            )
        });
        if let Err(e) = forgotten {
            // Keeping both slots is always safe; only detection of a
            // stale old content is weaker.
            warn!(
                "cannot forget the old checksum of block {b}: {}",
                crate::error::Chain(&e)
            );
        }
    }
}

impl Core {
    /// Wait until no block of `round` is Pending, syncing the data device
    /// once if needed, and return the state lock with all of them Clean.
    pub(super) fn make_writable(
        &self,
        round: &[Update<'_>],
    ) -> Result<MutexGuard<'_, State>, EngineError> {
        let mut st = self.lock();
        let mut resolves = 0;
        loop {
            if !st.marked_dirty {
                let mut sb = st.meta.superblock().clone();
                sb.clean = false;
                self.store_superblock(&mut st, sb)?;
                st.marked_dirty = true;
            }
            let mut busy = false;
            let mut pending = false;
            let mut uncertain = Vec::new();
            for u in round {
                let end = u.block + u.count;
                busy |= st.zeroing.iter().any(|&(b, e)| b < end && u.block < e);
                for b in u.block..end {
                    if let Some(p) = st.pending.get(&b) {
                        pending = true;
                        busy |= p.inflight > 0;
                    } else {
                        let p = st.meta.get(b)?;
                        if p.new != p.old {
                            uncertain.push((b, p));
                        }
                    }
                }
            }
            if busy {
                // Rewrite of a block whose earlier write is still in flight:
                // the sync must begin after that write completed.
                st = self
                    .completed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if pending && !st.may_rewrite(round) {
                log::debug!(
                    "a rewrite syncs the data first ({} extra versions held)",
                    st.extra_count
                );
                drop(st);
                self.flush_data()?;
                st = self.lock();
                continue;
            }
            if !uncertain.is_empty() {
                // A device that loses the pages we wrote (the simulated one
                // after a power cut, a lying disk) could keep us here
                // forever; fail the write instead.
                resolves += 1;
                if resolves > 3 {
                    return Err(EngineError::Meta(MetaError::Io {
                        what: "settling pairs left by a crash",
                        source: Arc::new(io::Error::other(format!(
                            "block {}: the metadata device does not keep what was written",
                            uncertain[0].0
                        ))),
                    }));
                }
                drop(st);
                self.resolve(&uncertain)?;
                st = self.lock();
                continue;
            }
            return Ok(st);
        }
    }

    /// Blocks whose pair has two different checksums but are not Pending:
    /// left by a crash or a failed data write. Find which slot it matches
    /// so that `old` describes it before a new write makes it Pending again.
    fn resolve(&self, blocks: &[(u64, Pair)]) -> Result<(), EngineError> {
        // A block whose data write failed may also hold a version its pair
        // no longer names (format version 3).
        let extras: Vec<Vec<u64>> = {
            let st = self.lock();
            blocks
                .iter()
                .map(|(b, _)| st.extras.get(b).cloned().unwrap_or_default())
                .collect()
        };
        let found = self.identify(blocks, &extras)?;
        let mut st = self.lock();
        for (&(b, p), sum) in blocks.iter().zip(found) {
            // Skip a block somebody else wrote meanwhile.
            if st.pending.contains_key(&b) || st.meta.get(b)? != p {
                continue;
            }
            // One that matched nothing is damaged: collapsing onto `old`
            // makes it look settled to the write path; reads of the
            // damage still fail.
            let sum = sum.unwrap_or(p.old);
            st.meta.set(b, Pair { new: sum, old: sum })?;
            st.drop_extras(b);
        }
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Sync the data, then read each of `blocks` and tell which of its
    /// checksums (pair, then `extras`) it matches, if any.
    pub(super) fn identify(
        &self,
        blocks: &[(u64, Pair)],
        extras: &[Vec<u64>],
    ) -> Result<Vec<Option<u64>>, EngineError> {
        if !self.opts.readonly {
            // What we read must be what a power cut would leave.
            self.data
                .sync()
                .map_err(EngineError::io("syncing data before resolving blocks"))?;
        }
        let mut buf = vec![0u8; self.block_size as usize];
        let mut found = Vec::with_capacity(blocks.len());
        for (&(b, p), extras) in blocks.iter().zip(extras) {
            self.data
                .read_at(&mut buf, self.offset(b))
                .map_err(EngineError::io("reading a block left pending by a crash"))?;
            found.push(self.sum.find_version(b, &buf, p, extras));
        }
        Ok(found)
    }

    /// Mark the round's data writes completed.
    ///
    /// A block whose write failed holds unknown content, so a later sync
    /// must not collapse its pair onto `new`: it leaves the Pending set with
    /// both slots kept, and the next write to it resolves it from the data
    /// (as after a crash).
    pub(super) fn complete(&self, round: &[Update<'_>], failed: &[bool]) {
        let mut st = self.lock();
        st.events += 1;
        let now = st.events;
        for (u, &failed) in round.iter().zip(failed) {
            if u.is_zero() {
                let range = (u.block, u.block + u.count);
                if let Some(i) = st.zeroing.iter().position(|&r| r == range) {
                    st.zeroing.swap_remove(i);
                }
            }
            for b in u.block..u.block + u.count {
                if let Some(p) = st.pending.get_mut(&b) {
                    p.inflight = p.inflight.saturating_sub(1);
                    p.completed = now;
                    if failed && p.inflight == 0 {
                        st.pending.remove(&b);
                    }
                }
            }
        }
        // A read that overlapped one of these writes may have seen part of
        // it: the bump tells it to look again (read.rs).
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
        drop(st);
        self.completed.notify_all();
    }

    /// Sync the data device (shared with every thread that needs one now)
    /// and forget the old checksum of each block whose writes had all
    /// completed before the sync began.
    pub(super) fn flush_data(&self) -> Result<(), EngineError> {
        let ticket = self.data_gate.ticket();
        let r = self
            .data_gate
            .sync_after(ticket, || {
                let began = self.lock().events;
                self.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
                super::Counters::timed(&self.counters.data_sync_us, || self.data.sync())?;
                self.forget_old(began);
                Ok(())
            })
            .map_err(EngineError::io("syncing the data device"));
        if let Some(wb) = &self.wb {
            // Writes the commit thread held back may go now (or, after a
            // failed sync, fail through the ordinary path).
            wb.synced(r.is_ok());
        }
        r
    }

    /// Make each of `blocks` (sorted, distinct) that is Pending with no
    /// write in flight durable on its own: write its current content
    /// again with a range sync, then forget its old checksum, as a data
    /// sync would (the media now hold that content and nothing older).
    /// For a few rewrites this costs a few small synced writes instead of
    /// a sync of everything written since the last one, which on a large
    /// sparse image means allocating all of it at once.
    pub(super) fn settle_blocks(&self, blocks: &[u64]) {
        let mine: Vec<u64> = {
            let mut st = self.lock();
            let st = &mut *st;
            blocks
                .iter()
                .copied()
                .filter(|&b| {
                    let zeroing = st.zeroing.iter().any(|&(s, e)| s <= b && b < e);
                    // Marked in flight, so no other write of the block, and
                    // no data sync's forget, runs while we rewrite it.
                    !zeroing
                        && st.pending.get_mut(&b).is_some_and(|p| {
                            let idle = p.inflight == 0;
                            p.inflight += u32::from(idle);
                            idle
                        })
                })
                .collect()
        };
        let mut done = Vec::with_capacity(mine.len());
        let mut buf = Vec::new();
        for run in mine.chunk_by(|a, b| a + 1 == *b) {
            let at = self.offset(run[0]);
            buf.resize(run.len() * self.block_size as usize, 0);
            let r = self
                .data
                .read_at(&mut buf, at)
                .and_then(|()| self.data.write_durable(&buf, at));
            match r {
                Ok(()) => done.extend_from_slice(run),
                // They stay Pending: what we wrote again was already a
                // content their pairs cover.
                Err(e) => warn!(
                    "cannot make blocks {}+{} durable on their own: {e}",
                    run[0],
                    run.len()
                ),
            }
        }
        let mut st = self.lock();
        for b in &mine {
            if let Some(p) = st.pending.get_mut(b) {
                p.inflight -= 1;
            }
        }
        for &b in &done {
            st.settle(b);
        }
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
        drop(st);
        self.completed.notify_all();
    }

    /// The sync thread: one data sync per request, until stopped, so the
    /// commit thread keeps writing Clean blocks while the sync runs.
    pub(super) fn run_syncer(&self) {
        while self.syncer.wait() {
            if let Err(e) = self.flush_data() {
                warn!(
                    "background data sync failed: {}; the writes waiting for it fail at their own sync",
                    crate::error::Chain(&e)
                );
            }
        }
    }

    fn forget_old(&self, began: u64) {
        let mut st = self.lock();
        let settled: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.inflight == 0 && p.completed <= began)
            .map(|(&b, _)| b)
            .collect();
        for b in settled {
            st.settle(b);
        }
        // Inside the lock: a read that sees the new pairs must also see
        // the bump, or it would report the race as a mismatch.
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Make the metadata on disk fully current: sync data, forget every old
    /// checksum that can be forgotten, write back, sync metadata.
    pub(super) fn settle(&self) -> Result<(), EngineError> {
        self.drain();
        self.settle_issued()
    }

    /// [`Self::settle`] for the writes already issued: what the commit
    /// thread runs after its own batch in synchronous mode (draining there
    /// would wait for itself).
    pub(super) fn settle_issued(&self) -> Result<(), EngineError> {
        {
            // Writes in flight would stay Pending through the sync.
            let mut st = self.lock();
            while !st.zeroing.is_empty() || st.pending.values().any(|p| p.inflight > 0) {
                st = self
                    .completed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        self.flush_data()?;
        self.checkpoint()
    }
}
