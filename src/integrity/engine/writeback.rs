//! The write-back stage: writes that completed before their data reached
//! the image.
//!
//! A write is recorded in the [`Stage`] (a region that outlives the
//! process) and completes; the commit thread takes the records in sequence
//! order, commits all their checksums with one metadata sync, writes their
//! data, and only then releases them from the stage. So at every instant a
//! completed write is in the stage or in the image (whose host page cache
//! survives the process), and a restarted engine replays the stage in the
//! same order the commit thread would have applied it.
//!
//! Several queues fill records at once: a record's place is reserved in
//! order under the stage lock, its data copied outside it. The commit
//! thread takes only the filled prefix of the queue, so it applies writes
//! in exactly the order replay would, and only what a writer published
//! (`Writeback::kick`, once per batch), so a batch commits in one round.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use log::error;

use super::rounds::{Source, Update};
use super::{Core, EngineError};
use crate::intmap::{IntMap, IntSet};
use crate::stage::{Filler, Record, Slot, Stage};

const RESERVED: u8 = 0;
const FILLED: u8 = 1;
/// Filling failed: the write returned an error and is never applied.
const FAILED: u8 = 2;

/// A batch whose writes rewrite at most this many Pending blocks makes
/// them durable one by one (a few synced writes of a block or a run of
/// them) instead of holding the writes for a sync of the whole device.
const SETTLE_ONE_BY_ONE: usize = 64;

/// A write held in the stage.
struct Entry {
    slot: Slot,
    block: u64,
    count: u64,
    sums: Vec<u64>,
    state: AtomicU8,
}

impl Entry {
    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

struct Wb {
    stage: Stage,
    /// Reserved records not yet taken by the commit thread, in order.
    queue: VecDeque<Arc<Entry>>,
    /// Newest filled record per block, for reads.
    overlay: IntMap<Arc<Entry>>,
    /// Records reserved and not yet committed (queued or being committed).
    outstanding: u64,
    /// Sequence number of the last write reserved, and of the last one
    /// committed (its data written, its record released).
    reserved: u64,
    /// The commit thread takes records up to this sequence number: a
    /// batch is published whole (`Writeback::kick`), so one round commits
    /// all of it rather than the prefix filled when the thread woke.
    published: u64,
    committed: u64,
    /// A staged write that failed after its completion was reported; the
    /// next FLUSH returns it.
    deferred: Option<EngineError>,
    /// Data syncs finished (any caller's), and whether the last failed:
    /// the commit thread retries the writes it holds back after each.
    synced: u64,
    sync_failed: bool,
    stopping: bool,
}

/// The stage and the queue the commit thread works through.
pub(super) struct Writeback {
    m: Mutex<Wb>,
    /// Wakes the commit thread: a record was filled, or stop.
    work: Condvar,
    /// Records were committed (room in the stage, drains may be done).
    done: Condvar,
    filler: Filler,
}

impl Writeback {
    pub fn new(stage: Stage) -> Self {
        Self {
            filler: stage.filler(),
            m: Mutex::new(Wb {
                stage,
                queue: VecDeque::new(),
                overlay: IntMap::default(),
                outstanding: 0,
                reserved: 0,
                published: 0,
                committed: 0,
                deferred: None,
                synced: 0,
                sync_failed: false,
                stopping: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Wb> {
        self.m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a write of `len` bytes goes through the stage.
    pub fn fits(&self, len: usize) -> bool {
        self.lock().stage.fits(len)
    }

    /// Writes completed and not yet in the image.
    pub fn queued(&self) -> u64 {
        self.lock().outstanding
    }

    pub fn set_generation(&self, generation: u64) -> Result<(), EngineError> {
        Ok(self.lock().stage.set_generation(generation)?)
    }

    pub fn with_data(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.filler.with_data(offset, len, f)
    }

    /// A data sync finished.
    pub fn synced(&self, ok: bool) {
        let mut st = self.lock();
        st.synced += 1;
        st.sync_failed = !ok;
        drop(st);
        self.work.notify_one();
    }

    /// Hand the records reserved so far to the commit thread: once per
    /// batch, after its records are filled.
    pub fn kick(&self) {
        self.publish(&mut self.lock());
    }

    /// Let the commit thread take every record reserved so far (it stops
    /// at the first one not yet filled) and wake it.
    fn publish(&self, st: &mut Wb) {
        st.published = st.reserved;
        self.work.notify_one();
    }

    /// Stop the commit thread after its current round; wake every waiter.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.work.notify_all();
        self.done.notify_all();
    }

    /// Copy the newest queued content of each block of `block..+count`
    /// into the matching part of `out` (grown to `count` blocks only when
    /// one of them is queued: most reads find none, and zeroing a buffer
    /// per read cost large reads a pass over their data); returns which
    /// blocks it copied. Under the stage lock, so no record is released
    /// (and its space reused) while it is copied.
    pub fn copy_queued(&self, block: u64, count: u64, bs: usize, out: &mut Vec<u8>) -> Vec<bool> {
        let wb = self.lock();
        if wb.overlay.is_empty() || !(block..block + count).any(|b| wb.overlay.contains_key(&b)) {
            return Vec::new();
        }
        out.resize(count as usize * bs, 0);
        (0..count)
            .map(|i| {
                let Some(e) = wb.overlay.get(&(block + i)) else {
                    return false;
                };
                let at = e.slot.data_offset + (block + i - e.block) * bs as u64;
                let dst = &mut out[i as usize * bs..(i as usize + 1) * bs];
                match self.filler.read(dst, at) {
                    Ok(()) => true,
                    Err(e) => {
                        error!("cannot read a queued write of block {}: {e}", block + i);
                        false
                    }
                }
            })
            .collect()
    }
}

impl Core {
    /// Record a write in the stage; it is complete when this returns Ok.
    pub(super) fn enqueue(
        &self,
        wb: &Writeback,
        block: u64,
        count: u64,
        data: &[u8],
        sums: Vec<u64>,
    ) -> Result<(), EngineError> {
        let entry = {
            let mut st = wb.lock();
            let slot = loop {
                if st.stopping {
                    return Err(EngineError::Stopping);
                }
                if let Some(slot) = st.stage.reserve(block, data.len())? {
                    break slot;
                }
                // The stage is full: wait for the commit thread, which
                // may not have been told of this batch's records yet.
                wb.publish(&mut st);
                st = wb.done.wait(st).unwrap_or_else(PoisonError::into_inner);
            };
            let e = Arc::new(Entry {
                slot,
                block,
                count,
                sums,
                state: AtomicU8::new(RESERVED),
            });
            st.queue.push_back(e.clone());
            st.outstanding += 1;
            st.reserved = slot.seq;
            e
        };
        // Outside the lock: queues fill their records in parallel.
        let filled = wb.filler.fill(&entry.slot, data);
        let mut st = wb.lock();
        match &filled {
            Ok(()) => {
                entry.state.store(FILLED, Ordering::Release);
                for b in block..block + count {
                    let newer = st
                        .overlay
                        .get(&b)
                        .is_none_or(|o| o.slot.seq < entry.slot.seq);
                    if newer {
                        st.overlay.insert(b, entry.clone());
                    }
                }
            }
            Err(_) => entry.state.store(FAILED, Ordering::Release),
        }
        drop(st);
        // The commit thread takes it once the batch is published
        // (`Writeback::kick`), not now: taking the first records of a batch
        // alone, it would commit a short prefix, and a FLUSH at the end of
        // the batch would wait for two metadata syncs instead of one.
        filled.map_err(EngineError::io("recording a write in the write-back stage"))
    }

    /// Wait until every write staged before this call has been committed.
    pub(super) fn drain(&self) {
        let Some(wb) = &self.wb else {
            return;
        };
        let mut st = wb.lock();
        let target = st.reserved;
        if st.committed < target {
            wb.publish(&mut st);
        }
        while st.committed < target && !st.stopping {
            st = wb.done.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The commit thread: take the filled prefix of the queue, commit it as
    /// one batch (one metadata sync for all of it), write the data, release
    /// it from the stage, repeat.
    ///
    /// A write to a block written since the last data sync would need a
    /// sync before its round (DESIGN §2). A few such blocks are made
    /// durable one by one first ([`Core::settle_blocks`]); beyond that,
    /// rather than wait for a sync, the thread holds such writes back in
    /// the stage, asks the sync thread for a sync, and writes the rest.
    /// Held writes go in a later batch, after a sync, before anything
    /// newer to their blocks. The stage is released only up to the oldest
    /// held write, so a process death replays them (and, harmlessly, the
    /// newer writes after them) in order.
    pub(super) fn run_committer(&self) {
        let Some(wb) = &self.wb else {
            return;
        };
        // Taken from the queue and not yet released from the stage, in order.
        let mut taken: VecDeque<Arc<Entry>> = VecDeque::new();
        // Of those, the ones held back, in order.
        let mut held: Vec<Arc<Entry>> = Vec::new();
        // Sequence numbers of held writes that newer ones overwrite: they
        // are never written (a newer write may have gone already), only
        // kept until what overwrites them is written.
        let mut superseded = IntSet::default();
        let mut seen_sync = 0;
        loop {
            let (fresh, failed_sync) = {
                let mut st = wb.lock();
                loop {
                    if st.stopping {
                        return;
                    }
                    let published = st.published;
                    let fresh = st
                        .queue
                        .front()
                        .is_some_and(|e| e.state() != RESERVED && e.slot.seq <= published);
                    if fresh || (!held.is_empty() && st.synced != seen_sync) {
                        break;
                    }
                    st = wb.work.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                let retry = st.synced != seen_sync;
                seen_sync = st.synced;
                let published = st.published;
                let n = st
                    .queue
                    .iter()
                    .position(|e| e.state() == RESERVED || e.slot.seq > published)
                    .unwrap_or(st.queue.len());
                let fresh: Vec<Arc<Entry>> = st.queue.drain(..n).collect();
                (fresh, retry && st.sync_failed)
            };
            taken.extend(fresh.iter().cloned());
            let mut batch = std::mem::take(&mut held);
            batch.extend(fresh);
            let Plan { live, go } = self.plan(&batch, &superseded, failed_sync);
            let updates = batch
                .iter()
                .enumerate()
                .filter(|&(i, e)| go[i] && live[i] && e.state() == FILLED)
                .map(|(i, e)| Update {
                    op: i,
                    block: e.block,
                    count: e.count,
                    source: Source::Staged {
                        offset: e.slot.data_offset,
                        len: e.slot.len as usize,
                    },
                    sums: e.sums.clone(),
                })
                .collect();
            let mut results: Vec<Result<(), EngineError>> = batch.iter().map(|_| Ok(())).collect();
            self.write_rounds(updates, &mut results);

            let mut st = wb.lock();
            for (i, (e, r)) in batch.iter().zip(&results).enumerate() {
                if !go[i] {
                    if !live[i] {
                        superseded.insert(e.slot.seq);
                    }
                    held.push(e.clone());
                    continue;
                }
                for b in e.block..e.block + e.count {
                    if st.overlay.get(&b).is_some_and(|o| Arc::ptr_eq(o, e)) {
                        st.overlay.remove(&b);
                    }
                }
                if let Err(err) = r {
                    error!(
                        "write of blocks {}+{} failed after it completed: {}; the next flush reports it",
                        e.block,
                        e.count,
                        crate::error::Chain(err)
                    );
                    st.deferred = Some(err.clone());
                }
            }
            // Every record before the oldest held one is in the image now
            // (or failed and was reported): the stage may forget them.
            let oldest_held = held.first().map_or(u64::MAX, |e| e.slot.seq);
            let mut last = None;
            while taken.front().is_some_and(|e| e.slot.seq < oldest_held) {
                last = taken.pop_front();
                st.outstanding -= 1;
            }
            superseded.retain(|&seq| seq >= oldest_held);
            if let Some(last) = last {
                if let Err(e) = st.stage.release(last.slot.end, last.slot.seq + 1) {
                    error!(
                        "cannot release written records from the stage: {}",
                        crate::error::Chain(&e)
                    );
                    st.deferred = Some(e.into());
                }
                st.committed = last.slot.seq;
            }
            drop(st);
            wb.done.notify_all();
            if !held.is_empty() {
                self.syncer.ask();
            }
        }
    }

    /// What becomes of each write of a batch: whether it still needs
    /// writing (`live`), and whether it is done this round (`go`) or held.
    fn plan(&self, batch: &[Arc<Entry>], superseded: &IntSet, failed_sync: bool) -> Plan {
        let dead: Vec<bool> = batch
            .iter()
            .map(|e| superseded.contains(&e.slot.seq))
            .collect();
        let newest = newest_writes(batch, &dead);
        let live: Vec<bool> = batch
            .iter()
            .enumerate()
            .map(|(i, e)| (e.block..e.block + e.count).any(|b| newest.get(&b) == Some(&i)))
            .collect();
        let versions = self.lock().meta.log_versions();
        let mut go = if failed_sync || versions {
            // The sync they waited for failed: the ordinary path syncs
            // again and fails them if it cannot. With format version 3 a
            // rewrite needs no sync first (its record carries the versions
            // the block may hold); the rare one that does (a block with
            // many versions, a full log) syncs in the ordinary path.
            vec![true; batch.len()]
        } else {
            self.settle_rewritten(batch, &live);
            self.writable_now(batch, &live)
        };
        // A write that newer ones overwrite is done only when they are:
        // released earlier, a FLUSH could return with neither written.
        for (i, e) in batch.iter().enumerate() {
            if !live[i] && e.state() == FILLED {
                go[i] = (e.block..e.block + e.count).all(|b| newest.get(&b).is_none_or(|&j| go[j]));
            }
        }
        Plan { live, go }
    }

    /// When the live writes of `batch` rewrite at most
    /// [`SETTLE_ONE_BY_ONE`] Pending blocks, make those durable one by one
    /// ([`Core::settle_blocks`]) so the writes go now, rather than holding
    /// them for a sync of the whole device.
    fn settle_rewritten(&self, batch: &[Arc<Entry>], live: &[bool]) {
        let mut blocks: Vec<u64> = {
            let st = self.lock();
            batch
                .iter()
                .zip(live)
                .filter(|(e, &live)| live && e.state() == FILLED)
                .flat_map(|(e, _)| e.block..e.block + e.count)
                .filter(|b| st.pending.contains_key(b))
                .take(SETTLE_ONE_BY_ONE + 1)
                .collect()
        };
        if blocks.is_empty() || blocks.len() > SETTLE_ONE_BY_ONE {
            return;
        }
        blocks.sort_unstable();
        blocks.dedup();
        self.settle_blocks(&blocks);
    }

    /// Which writes of `batch` may be written now without a data sync
    /// first: none of their blocks is Pending, nor written by an earlier
    /// write of the batch that is held back or goes now (its round would
    /// need the sync). The rest are held back.
    fn writable_now(&self, batch: &[Arc<Entry>], live: &[bool]) -> Vec<bool> {
        let st = self.lock();
        let mut touched = IntSet::default();
        batch
            .iter()
            .zip(live)
            .map(|(e, &live)| {
                if !live || e.state() != FILLED {
                    // Nothing to write: done either way.
                    return true;
                }
                let blocks = e.block..e.block + e.count;
                let wait = blocks
                    .clone()
                    .any(|b| touched.contains(&b) || st.pending.contains_key(&b));
                touched.extend(blocks);
                !wait
            })
            .collect()
    }

    /// FLUSH: everything completed so far reaches the data device and is
    /// synced; a write-back failure since the last flush fails this one.
    pub(super) fn flush_all(&self) -> Result<(), EngineError> {
        self.drain();
        self.flush_data()?;
        match self.wb.as_ref().and_then(|wb| wb.lock().deferred.take()) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// At open: apply the records a dead engine left, in order (commit
    /// their checksums, then write their data), then release them.
    pub(super) fn replay(&self, records: &[Record]) -> Result<(), EngineError> {
        let Some(wb) = &self.wb else {
            return Ok(());
        };
        if records.is_empty() {
            return Ok(());
        }
        let bs = self.block_size as usize;
        let mut updates = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let len = r.len as usize;
            let count = (len / bs) as u64;
            if !len.is_multiple_of(bs) || self.check_range(r.block, count).is_err() {
                // A record that verifies cannot say this unless the stage
                // was written by a twinsum with other geometry.
                return Err(EngineError::Io {
                    what: "replaying the write-back stage",
                    source: Arc::new(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "record {} writes {len} bytes at block {}, which this disk cannot hold",
                            r.seq, r.block
                        ),
                    )),
                });
            }
            let mut sums = Vec::new();
            wb.with_data(r.data_offset, len, &mut |d| {
                sums = self.sums_of(r.block, d);
                Ok(())
            })
            .map_err(EngineError::io("reading the write-back stage"))?;
            updates.push(Update {
                op: i,
                block: r.block,
                count,
                source: Source::Staged {
                    offset: r.data_offset,
                    len,
                },
                sums,
            });
        }
        let mut results: Vec<Result<(), EngineError>> = records.iter().map(|_| Ok(())).collect();
        self.write_rounds(updates, &mut results);
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            // The records stay: the next start tries again.
            return Err(e);
        }
        wb.lock().stage.release_all()?;
        Ok(())
    }
}

/// Per write of a commit batch: `live` unless newer writes of the batch
/// overwrite all of it; `go` if it is done this round rather than held.
struct Plan {
    live: Vec<bool>,
    go: Vec<bool>,
}

/// Per block, the newest filled write of `batch` to it. An older write
/// whose every block a newer one of the same batch overwrites never has to
/// reach the disk (neither was flushed yet: a FLUSH drains the stage before
/// it syncs), and skipping it spares the data sync a rewrite round would
/// cost.
fn newest_writes(batch: &[Arc<Entry>], dead: &[bool]) -> IntMap<usize> {
    let mut last = IntMap::with_capacity_and_hasher(batch.len(), Default::default());
    for (i, e) in batch.iter().enumerate() {
        if e.state() != FILLED || dead[i] {
            continue;
        }
        for b in e.block..e.block + e.count {
            last.insert(b, i);
        }
    }
    last
}
