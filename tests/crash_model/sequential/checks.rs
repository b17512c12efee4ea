//! Judging a sequential case: after a power cut, after a process death,
//! each live read, and the metadata of synchronous mode, all against the
//! case's [`BlockModel`](crate::model::BlockModel)s.

use twinsum::integrity::{Engine, EngineError};
use twinsum::io::Device;
use twinsum::meta::{PAIR_SIZE, TABLE_OFFSET};

use super::Case;
use crate::device::TestDevice;
use crate::figures::Figures;
use crate::support::{tag, tags, Content, Outcome};

impl Case<'_> {
    /// After a process death and restart: every block reads its last
    /// completed content (or one the dying batch wrote), flushed or not.
    pub(super) fn check_after_death(&mut self, engine: &Engine) -> Outcome {
        let mut buf = vec![0u8; self.bs];
        for b in 0..self.blocks {
            let r = engine.read(b, &mut buf);
            Figures::add(&self.figures.blocks_checked_after_death, 1);
            let m = &self.model[b as usize];
            let dying: Vec<&Content> = self
                .dying
                .iter()
                .filter(|(db, _)| *db == b)
                .map(|(_, c)| c)
                .collect();
            let is_current = *m.current == *buf;
            match r {
                Ok(()) if (is_current && m.current_ok) || dying.iter().any(|c| ***c == *buf) => {}
                Ok(()) => {
                    return Err(format!(
                        "after a process death block {b} reads {} but its last completed write is {}{} (dying batch: [{}])",
                        tag(&buf),
                        tag(&m.current),
                        if m.current_ok { "" } else { " (damaged, must fail)" },
                        tags(dying)
                    ))
                }
                Err(EngineError::Mismatch { .. }) if !m.current_ok => {
                    // A torn survivor of an earlier power cut, still caught
                    // (the dying batch's write to it never landed).
                    continue;
                }
                Err(e) => {
                    if matches!(e, EngineError::Mismatch { .. }) {
                        Figures::add(&self.figures.false_mismatches, 1);
                    }
                    return Err(format!(
                        "after a process death block {b} fails to read: {e} (last completed {}, dying [{}])",
                        tag(&m.current),
                        tags(dying)
                    ));
                }
            }
            let m = &mut self.model[b as usize];
            m.current = buf.as_slice().into();
            m.current_ok = true;
        }
        self.dying.clear();
        Ok(())
    }

    /// After a crash and reopen: every block is checked against the model.
    pub(super) fn check_survivors(&mut self, engine: &Engine, data: &TestDevice) -> Outcome {
        let mut buf = vec![0u8; self.bs];
        let mut survivor = vec![0u8; self.bs];
        for b in 0..self.blocks {
            data.read_at(&mut survivor, b * self.bs as u64)
                .map_err(|e| e.to_string())?;
            let m = &self.model[b as usize];
            let legit = m.legit(&survivor);
            let still_damaged = !legit && *m.durable == *survivor;
            let torn = !legit && !still_damaged;
            if m.since.is_empty() && m.durable_ok && !legit {
                return Err(format!(
                    "block {b} lost its flushed content {}: it holds {}",
                    tag(&m.durable),
                    m.describe_sectors(&survivor)
                ));
            }
            if torn && !m.sectors_known(&survivor) {
                return Err(format!(
                    "block {b} holds content that was never written to it: {}",
                    m.describe_sectors(&survivor)
                ));
            }
            let r = engine.read(b, &mut buf);
            Figures::add(&self.figures.blocks_checked, 1);
            match (legit, r) {
                (true, Ok(())) if buf == survivor => {}
                (true, Ok(())) => {
                    return Err(format!(
                        "block {b}: read returned {} but the device holds {}",
                        tag(&buf),
                        tag(&survivor)
                    ))
                }
                (true, Err(EngineError::Mismatch { .. })) => {
                    Figures::add(&self.figures.false_mismatches, 1);
                    return Err(format!(
                        "FALSE MISMATCH after crash: block {b} holds {} (legitimate: durable {}{}, written since [{}]) but the read failed",
                        tag(&survivor),
                        tag(&m.durable),
                        if m.durable_ok { "" } else { " (damaged)" },
                        tags(&m.since)
                    ));
                }
                (false, Err(EngineError::Mismatch { block })) if block == b => {
                    let counter = if torn {
                        &self.figures.torn_detected
                    } else {
                        &self.figures.damaged_detected
                    };
                    Figures::add(counter, 1);
                }
                (false, Ok(())) => {
                    return Err(format!(
                        "block {b}: {} content {} read back without error (legitimate: durable {}, since [{}])",
                        if torn { "torn" } else { "damaged" },
                        m.describe_sectors(&survivor),
                        tag(&m.durable),
                        tags(&m.since)
                    ))
                }
                (_, Err(e)) => return Err(format!("block {b}: read after crash failed: {e}")),
            }
            trace!(
                self,
                "  block {b}: {} {}",
                tag(&survivor),
                if legit {
                    "ok"
                } else if torn {
                    "torn, detected"
                } else {
                    "damaged, detected"
                }
            );
            self.model[b as usize].survived(&survivor, legit);
        }
        Ok(())
    }

    /// DESIGN §4: in synchronous mode each completed write leaves the
    /// metadata on the device fully current, old checksum forgotten: the
    /// durable pair of every block just written is (c, c) for its content.
    pub(super) fn check_metadata_current(&self, written: &[u64]) -> Outcome {
        let Some(meta) = &self.meta else {
            return Ok(());
        };
        for &b in written {
            let mut raw = [0u8; PAIR_SIZE as usize];
            meta.inner()
                .read_at(&mut raw, TABLE_OFFSET + b * PAIR_SIZE)
                .map_err(|e| e.to_string())?;
            let new = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let old = u64::from_le_bytes(raw[8..16].try_into().unwrap());
            let content = &self.model[b as usize].current;
            if new != old || !self.checksum().matches(b, content, new) {
                return Err(format!(
                    "synchronous mode: a completed write of block {b} ({}) left the durable pair ({new:#x}, {old:#x}), not its checksum in both slots",
                    tag(content)
                ));
            }
        }
        Ok(())
    }

    /// Check one read of a completed batch against the model as it was
    /// before the batch, plus whatever the batch itself wrote.
    pub(super) fn check_read(
        &self,
        block: u64,
        count: u64,
        r: &Result<(), EngineError>,
        buf: &[u8],
        batch_writes: &[(u64, Content)],
    ) -> Outcome {
        Figures::add(&self.figures.reads_checked, 1);
        match r {
            Ok(()) => {
                for (i, got) in buf.chunks(self.bs).enumerate() {
                    let b = block + i as u64;
                    let m = &self.model[b as usize];
                    let from_batch = batch_writes.iter().any(|(wb, c)| *wb == b && **c == *got);
                    let ok = from_batch || (m.current_ok && *m.current == *got);
                    if !ok {
                        return Err(format!(
                            "read of block {b} returned {} ({}), expected {}{}",
                            tag(got),
                            if *m.current == *got {
                                "a damaged content that must not verify"
                            } else {
                                "wrong data"
                            },
                            tag(&m.current),
                            if m.current_ok { "" } else { " (damaged)" }
                        ));
                    }
                }
                Ok(())
            }
            Err(EngineError::Mismatch { block: bad }) => {
                let in_range = (block..block + count).contains(bad);
                if in_range && !self.model[*bad as usize].current_ok {
                    return Ok(());
                }
                Figures::add(&self.figures.false_mismatches, 1);
                Err(format!(
                    "FALSE MISMATCH: read of {block}+{count} failed on block {bad}, which holds {}",
                    self.model
                        .get(*bad as usize)
                        .map_or("?".to_string(), |m| tag(&m.current))
                ))
            }
            Err(e) => Err(format!("read of {block}+{count} failed: {e}")),
        }
    }
}
