//! Opening an engine: the superblock and its flags, the metadata log
//! replayed over the table, and the write-back stage of a dead engine
//! replayed before anything is served.

use super::*;

impl Core {
    pub(super) fn open(
        data: DeviceRef,
        meta: DeviceRef,
        stage: StageConfig,
        opts: EngineOptions,
    ) -> Result<(Self, Replayed), EngineError> {
        let metadata =
            Metadata::open_with(meta.clone(), opts.cache_pages.max(16), opts.key.as_ref())?;
        metadata.check_image(data.size())?;
        if !opts.readonly {
            // Metadata of an older twinsum may be sparse. Serving it that
            // way works, so a file system too full to reserve it is no
            // reason to refuse the disk.
            if let Err(e) = metadata.reserve_table() {
                warn!(
                    "{}; table pages allocate as they are written",
                    crate::error::Chain(&e)
                );
            }
        }
        let sb = metadata.superblock().clone();
        if !sb.clean {
            warn!(
                "metadata was not shut down cleanly (generation {}); every block still verifies against one of its two checksums",
                sb.generation
            );
            if !opts.readonly {
                // Whatever the dead process left in the host's caches becomes
                // durable now, so that what we read from here on is what a
                // later power cut would leave.
                data.sync()
                    .map_err(EngineError::io("syncing the data device at open"))?;
                meta.sync()
                    .map_err(EngineError::meta_io("syncing the metadata at open"))?;
            }
        }
        let ident = Identity {
            salt: sb.salt,
            generation: sb.generation,
            block_size: sb.block_size,
            blocks: sb.blocks,
            data_size: sb.data_size,
        };
        let (stage, recovered) = Stage::open(stage.region, ident, stage.boot, rand::random())?;
        let replayed = Replayed {
            log_records: metadata.log_replay().records,
            writes: recovered.records.len() as u64,
            bytes: recovered.records.iter().map(|r| u64::from(r.len)).sum(),
            torn: recovered.torn,
            earlier_boot: recovered.earlier_boot,
        };
        if let Some(n) = recovered.earlier_boot {
            warn!(
                "the write-back stage is from an earlier boot of this host: its {n} completed but unflushed writes were lost with the host, as a power cut loses a volatile cache"
            );
        }
        if opts.readonly && !recovered.records.is_empty() {
            return Err(EngineError::StageNeedsReplay(recovered.records.len()));
        }
        let write_back = opts.write_cache && !opts.readonly;
        let mut core = Self {
            block_size: sb.block_size,
            blocks: sb.blocks,
            sum: Checksum::of(&sb, opts.key.as_ref()).map_err(crate::meta::MetaError::from)?,
            was_clean: sb.clean,
            state: Mutex::new(State::new(metadata, !sb.clean)),
            completed: Condvar::new(),
            wb: None,
            data_gate: SyncGate::default(),
            meta_gate: SyncGate::default(),
            sync_mode: AtomicBool::new(false),
            log_order: Mutex::new(rounds::LogOrder::default()),
            log_turn: Condvar::new(),
            checkpointing: Mutex::new(()),
            ckpt: Wakeup::default(),
            syncer: Wakeup::default(),
            pair_changes: AtomicU64::new(0),
            counters: Counters::default(),
            recent: Recent::default(),
            data,
            meta_dev: meta,
            opts,
        };
        // The stage first: the checkpoint after the log replay stores a
        // superblock, whose new generation the stage must learn of.
        core.wb = Some(Writeback::new(stage));
        core.recover_log()?;
        core.replay(&recovered.records)?;
        if !write_back {
            // Without a write cache the stage only served the replay.
            core.wb = None;
        }
        if replayed.writes > 0 {
            info!(
                "replayed {} completed writes ({} bytes) that the last twinsum left in its write-back stage{}",
                replayed.writes,
                replayed.bytes,
                match replayed.torn {
                    0 => String::new(),
                    n => format!("; {n} writes that never completed were skipped"),
                }
            );
        } else if replayed.torn > 0 {
            info!(
                "the write-back stage held {} writes that never completed; skipped",
                replayed.torn
            );
        }
        Ok((core, replayed))
    }

    /// At open: what the metadata log holds since the last checkpoint goes
    /// into the table (a writer only), is made durable by a checkpoint,
    /// and the log starts empty. A read-only engine reads through the
    /// replayed pairs instead and writes nothing.
    pub(super) fn recover_log(&self) -> Result<(), EngineError> {
        let replay = {
            let st = self.lock();
            st.meta.log_replay()
        };
        if replay.records > 0 {
            info!(
                "replayed {} metadata log records ({} checksum pairs) over the pair table",
                replay.records, replay.entries
            );
        }
        if !self.opts.readonly {
            self.lock().meta.recover()?;
        }
        self.resolve_versions()?;
        if !self.opts.readonly && replay.records > 0 {
            self.checkpoint()?;
        }
        if let Some(mark) = self.lock().meta.log_mark() {
            self.log_order
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next = mark.seq;
        }
        Ok(())
    }

    /// Format version 3: blocks the log replay gave more checksums than a
    /// pair holds (rewritten before a data sync when the process died).
    /// Their data (synced at an unclean open) tells which one holds; the
    /// pair becomes that one twice, before the checkpoint that follows
    /// drops the records. A block that matches none is damaged: it keeps
    /// the pair of its last record, and reads of it fail.
    fn resolve_versions(&self) -> Result<(), EngineError> {
        let versions = self.lock().meta.take_versions();
        if versions.is_empty() {
            return Ok(());
        }
        let mut blocks = Vec::with_capacity(versions.len());
        let mut extras = Vec::with_capacity(versions.len());
        {
            let mut st = self.lock();
            for (b, v) in versions {
                blocks.push((b, st.meta.get(b)?));
                extras.push(v);
            }
        }
        let found = self.identify(&blocks, &extras)?;
        let mut st = self.lock();
        let mut damaged = 0;
        for (&(b, _), sum) in blocks.iter().zip(found) {
            let Some(sum) = sum else {
                damaged += 1;
                continue;
            };
            let pair = crate::meta::Pair { new: sum, old: sum };
            if self.opts.readonly {
                st.meta.set_in_memory(b, pair)?;
            } else {
                st.meta.set(b, pair)?;
            }
        }
        info!(
            "resolved {} blocks the metadata log named several versions of{}",
            blocks.len(),
            match damaged {
                0 => String::new(),
                n => format!("; {n} match none of them"),
            }
        );
        Ok(())
    }
}
