//! The crash model (issue 2, item 5): proof that a power cut never causes a
//! false mismatch, and that injected faults are caught.
//!
//! Both the data and the metadata device are [`device::TestDevice`]s: a
//! write lands in a volatile cache, a sync makes the cache durable, and a
//! power cut keeps or drops every un-synced 512-byte sector independently
//! (including intermediate versions of a sector written several times).
//! A shared fuse also cuts the power in the middle of an engine call, so
//! states that exist only between two device calls of one batch are
//! covered too.
//!
//! The suites, one module each:
//!
//! - [`sequential`]: each case (one seed) formats a small disk, then
//!   repeats: open the engine, check every block against the reference
//!   model, run random batches (writes, rewrites, the same block twice in
//!   one batch, zeroes, reads, flushes), write-backs, synchronous-mode
//!   switches and clean stops, and crash: a power cut or a death of the
//!   process (the stage survives and is replayed).
//! - [`concurrent`]: the same with two or three threads submitting at once
//!   on a few shared blocks, judged from a history of logical issue and
//!   completion times.
//! - [`faults`]: bit flips and misdirected, lost and forged writes injected
//!   into fully written-back disks; exactly the damaged block must fail.
//! - [`races`]: targeted interleavings, each forced by holding one device
//!   call.
//!
//! [`model`] is the reference they judge by: per block, every content the
//! block may legitimately hold after a crash (the content of the last
//! completed flush plus every content written since). After each crash:
//!
//! - a block holding a legitimate content must read back without error
//!   (anything else is a *false mismatch*, the bug this test exists for);
//! - a block holding anything else (a torn 4096-byte block: some sectors
//!   new, some old) must fail to read, and each of its sectors must come
//!   from some legitimate content (nothing may invent data);
//! - a block whose last write a completed flush (or synchronous mode)
//!   covered must hold exactly that content.
//!
//! In synchronous mode the durable pair of every block just written must
//! also be current (DESIGN §4). [`figures`] counts what a run reached and
//! requires a minimum of crash states, torn blocks, log replays,
//! checkpoints and the rest, so that a device that never loses a write
//! cannot pass.
//!
//! One seed in four (`seed % 4 == 1`, in every seeded suite) formats the disk
//! with keyed checksums: the algorithm is a parameter of the engine, and
//! the state machine must hold whichever it is given.
//!
//! Two seeds in three (`seed % 3 != 0`, in every suite but [`races`])
//! format version 2 metadata, with a metadata log of 16 or 64 KiB: small,
//! so that it wraps and fills, a full log commits a round by checkpoint
//! and a half-full one wakes the checkpoint thread. The figures count the
//! log records replayed at each open and the power cuts whose surviving
//! superblock starts replay from a later checkpoint than the engine was
//! opened on, and require a minimum of both.
//!
//! Environment:
//! - `TWINSUM_CRASH_SEEDS=N`: seeds for `crash_model` (default 10,000; the
//!   `make crash-model` target runs 100,000); the concurrent run takes N/5.
//! - `TWINSUM_CRASH_FIRST_SEED=K`: start at seed K instead of 0.
//! - `TWINSUM_CRASH_SEED=S`: replay one sequential seed with a trace of
//!   every operation and of the power cut.
//! - `TWINSUM_CONCURRENT_SEED=S`: replay one concurrent seed, up to 200
//!   times (the interleaving is the scheduler's), with a trace of batches.
//! - `TWINSUM_RACE_MILLIS=M`: how long the read race stress runs (1000).

mod concurrent;
mod device;
mod faults;
mod figures;
mod model;
mod races;
mod sequential;
mod support;
