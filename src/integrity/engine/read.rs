//! Verified reads (DESIGN §2.4).

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use log::error;

use super::pairs::State;
use super::{Core, EngineError, OnMismatch};
use crate::integrity::hash::Verdict;
use crate::meta::Pair;

/// Reads retry at most this often while pairs keep changing under them.
const READ_RETRIES: usize = 16;

impl Core {
    pub(super) fn read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let count = self.block_count(buf.len())?;
        self.check_range(block, count)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let bad = self.read_verified(block, count, buf)?;
        match (bad.first(), self.opts.on_mismatch) {
            (Some(&first), OnMismatch::Error) => Err(EngineError::Mismatch { block: first }),
            _ => Ok(()),
        }
    }

    /// [`Op::TryRead`](super::Op::TryRead): a mismatch fails the read
    /// quietly and leaves zeros in `buf`, so that what did not verify is
    /// not left where its owner can see it. Not counted: the caller
    /// counts a request once ([`Engine::count_read`](super::Engine::count_read)).
    pub(super) fn try_read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let count = self.block_count(buf.len())?;
        self.check_range(block, count)?;
        let r = self.read_checked(block, count, buf).and_then(|bad| {
            bad.first()
                .map_or(Ok(()), |&block| Err(EngineError::Mismatch { block }))
        });
        if r.is_err() {
            buf.fill(0);
        }
        r
    }

    /// A scrub's read: the same verification as a guest read, but every
    /// mismatched block is returned (whatever `on_mismatch` says) and the
    /// read does not count as a guest read.
    pub(super) fn scrub_blocks(&self, block: u64, buf: &mut [u8]) -> Result<Vec<u64>, EngineError> {
        let count = self.block_count(buf.len())?;
        self.check_range(block, count)?;
        self.read_verified(block, count, buf)
    }

    /// Fill `buf` with blocks `block..block + count` and return those that
    /// match neither checksum, each counted, logged and remembered.
    fn read_verified(
        &self,
        block: u64,
        count: u64,
        buf: &mut [u8],
    ) -> Result<Vec<u64>, EngineError> {
        let bad = self.read_checked(block, count, buf)?;
        if !bad.is_empty() {
            self.counters
                .mismatches
                .fetch_add(bad.len() as u64, Ordering::Relaxed);
            for b in &bad {
                error!(
                    "checksum mismatch in block {b} (byte offset {}): its data matches neither stored checksum",
                    self.offset(*b)
                );
            }
            self.recent.note(&bad);
        }
        Ok(bad)
    }

    /// Fill `buf` and return the blocks that match neither checksum,
    /// looking again at those that may have raced a write.
    fn read_checked(
        &self,
        block: u64,
        count: u64,
        buf: &mut [u8],
    ) -> Result<Vec<u64>, EngineError> {
        let bs = self.block_size as usize;
        let mut pairs = vec![Pair::default(); count as usize];
        let mut queued_data = Vec::new();
        for attempt in 0.. {
            // Writes still in the write-back stage are the newest content
            // of their blocks; copy them before reading the device, so a
            // write that leaves the stage meanwhile is not missed.
            let queued = match &self.wb {
                Some(wb) => wb.copy_queued(block, count, bs, &mut queued_data),
                None => Vec::new(),
            };
            // Pairs are read after the data: a write sets `new` before its
            // data is issued, so the pairs are never older than the data.
            let before = self.pair_changes.load(Ordering::SeqCst);
            self.data
                .read_at(buf, self.offset(block))
                .map_err(EngineError::io("reading data"))?;
            self.lock().meta.get_range(block, &mut pairs)?;
            let raced = self.pair_changes.load(Ordering::SeqCst) != before;

            let mut bad = Vec::new();
            for (i, (data, p)) in buf.chunks_exact_mut(bs).zip(&pairs).enumerate() {
                let b = block + i as u64;
                if queued.get(i).copied().unwrap_or(false) {
                    data.copy_from_slice(&queued_data[i * bs..(i + 1) * bs]);
                } else if self.sum.verify(b, data, p.new, p.old) == Verdict::Neither {
                    bad.push(b);
                }
            }
            if bad.is_empty() {
                return Ok(bad);
            }
            let raced = self.wait_for_writes_to(&bad, before) || raced;
            if !raced || attempt >= READ_RETRIES {
                return Ok(bad);
            }
            if count > 1 {
                // Look again at just those blocks, one at a time: a long
                // read beside a sequential writer would otherwise catch
                // some other block mid-write on every pass, and give up.
                let mut still = Vec::new();
                for b in bad {
                    let i = (b - block) as usize;
                    still.extend(self.read_checked(b, 1, &mut buf[i * bs..(i + 1) * bs])?);
                }
                return Ok(still);
            }
        }
        unreachable!("the retry loop returns")
    }

    /// Whether a data write to one of `bad` may have overlapped a device
    /// read begun after `before` was taken; if one is still in flight,
    /// wait for it. A buffered read is not atomic against a write of the
    /// same page: it can see part of each, which matches neither checksum
    /// although the pair was committed before the read began (so no pair
    /// changed during it). Such a write is either in flight now or has
    /// completed since, which bumps `pair_changes`.
    fn wait_for_writes_to(&self, bad: &[u64], before: u64) -> bool {
        let in_flight = |st: &State| {
            bad.iter()
                .any(|b| st.pending.get(b).is_some_and(|p| p.inflight > 0))
        };
        let st = self.lock();
        let writing = in_flight(&st);
        if writing {
            drop(
                self.completed
                    .wait_while(st, |st| in_flight(st))
                    .unwrap_or_else(PoisonError::into_inner),
            );
        } else {
            drop(st);
        }
        writing || self.pair_changes.load(Ordering::SeqCst) != before
    }
}
