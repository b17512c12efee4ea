//! Running parsed requests against the engine as one batch.
//!
//! Data never goes from guest memory to the engine directly (DESIGN §2):
//! OUT data is copied into a buffer we own before it is hashed and written,
//! and IN data is read into a buffer we own, verified, and only then copied
//! to the guest.

use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::ratelimit::RateLimit;
use super::request::{
    gather, scatter, status_of, Kind, Limits, ParseError, Request, RequestError, Segments, ID_LEN,
};
use crate::integrity::{Engine, EngineError, Op};

/// A batch is cut into engine submissions of about this many data bytes,
/// so a full ring of large requests does not hold gigabytes of buffers.
const BATCH_BYTES: usize = 64 << 20;

/// The disk as virtio-blk sees it: the engine plus what requests are
/// checked against. Shared by every queue and every connection.
pub struct Disk {
    engine: Arc<Engine>,
    limits: Limits,
    readonly: bool,
    serial: [u8; ID_LEN],
    log: RateLimit,
}

/// A finished request: the head to return and the bytes written to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// One request on its way through a batch.
struct Job {
    head: u16,
    status: Option<GuestAddress>,
    work: Work,
    error: Option<RequestError>,
}

enum Work {
    Nothing,
    Read {
        block: u64,
        buf: Vec<u8>,
        data: Segments,
    },
    Write {
        block: u64,
        buf: Vec<u8>,
    },
    Zero(Vec<(u64, u64)>),
    Flush,
    GetId {
        len: usize,
        data: Segments,
    },
}

impl Work {
    fn bytes(&self) -> usize {
        match self {
            Work::Read { buf, .. } | Work::Write { buf, .. } => buf.len(),
            _ => 0,
        }
    }

    fn modifies(&self) -> bool {
        matches!(self, Work::Write { .. } | Work::Zero(_))
    }
}

impl Disk {
    /// `serial` is truncated to 20 bytes (the caller validates it).
    pub fn new(engine: Arc<Engine>, limits: Limits, readonly: bool, serial: &str) -> Self {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            engine,
            limits,
            readonly,
            serial: id,
            log: RateLimit::new(20, Duration::from_secs(5)),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// A rate-limited warning, for anything a guest can trigger at will.
    pub fn warn(&self, args: std::fmt::Arguments<'_>) {
        self.log.log(log::Level::Warn, args);
    }

    /// Shutdown signal (DESIGN §4): write out all metadata, then keep it
    /// current after every write.
    pub fn enter_sync_mode(&self, why: &str) {
        if self.readonly {
            return;
        }
        match self.engine.enter_sync_mode() {
            Ok(()) => log::info!("{why}: metadata is now written synchronously"),
            Err(e) => log::error!("{why}: cannot switch to synchronous metadata: {e}"),
        }
    }

    /// The driver started the device again: back to lazy write-back.
    pub fn leave_sync_mode(&self, why: &str) {
        if self.readonly || !self.engine.sync_mode() {
            return;
        }
        match self.engine.leave_sync_mode() {
            Ok(()) => log::info!("{why}: leaving synchronous metadata mode"),
            Err(e) => log::error!("{why}: cannot leave synchronous metadata mode: {e}"),
        }
    }

    /// Periodic write-back of dirty metadata pages.
    pub fn writeback(&self) {
        if self.readonly {
            return;
        }
        if let Err(e) = self.engine.writeback() {
            log::error!("metadata write-back failed: {e}");
        }
    }

    /// Orderly stop point: everything durable, the metadata marked clean.
    pub fn make_clean(&self, why: &str) {
        if self.readonly {
            return;
        }
        match self.engine.make_clean() {
            Ok(()) => log::info!("{why}: metadata written back and marked clean"),
            Err(e) => log::error!("{why}: cannot mark the metadata clean: {e}"),
        }
    }

    /// Run every request of one ring drain and write the results, data and
    /// status bytes into guest memory. `write_through` (the driver turned
    /// the write cache off) makes writes durable before they complete.
    pub fn run<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        parsed: Vec<Result<Request, ParseError>>,
        write_through: bool,
    ) -> Vec<Used> {
        let mut used = Vec::with_capacity(parsed.len());
        let mut jobs = Vec::new();
        let mut bytes = 0;
        for p in parsed {
            let job = self.prepare(mem, p);
            bytes += job.work.bytes();
            jobs.push(job);
            if bytes >= BATCH_BYTES {
                self.submit(&mut jobs, write_through);
                used.extend(jobs.drain(..).map(|j| self.finish(mem, j)));
                bytes = 0;
            }
        }
        if !jobs.is_empty() {
            self.submit(&mut jobs, write_through);
            used.extend(jobs.into_iter().map(|j| self.finish(mem, j)));
        }
        used
    }

    /// Turn a parsed request into owned buffers ready for the engine.
    fn prepare<M: GuestMemory + ?Sized>(&self, mem: &M, p: Result<Request, ParseError>) -> Job {
        let req = match p {
            Ok(r) => r,
            Err(e) => {
                return Job {
                    head: e.head,
                    status: e.status,
                    work: Work::Nothing,
                    error: Some(e.error),
                }
            }
        };
        let mut job = Job {
            head: req.head,
            status: Some(req.status),
            work: Work::Nothing,
            error: None,
        };
        let modifies = matches!(req.kind, Kind::Write { .. } | Kind::Zero { .. });
        if modifies && self.readonly {
            job.error = Some(RequestError::ReadOnly);
            return job;
        }
        job.work = match req.kind {
            Kind::Read { len: 0, .. } | Kind::Write { len: 0, .. } => Work::Nothing,
            Kind::Read { block, len, data } => Work::Read {
                block,
                buf: vec![0; len],
                data,
            },
            Kind::Write { block, len, data } => {
                let mut buf = vec![0; len];
                if let Err(e) = gather(mem, &data, &mut buf) {
                    job.error = Some(e);
                    return job;
                }
                Work::Write { block, buf }
            }
            Kind::Zero { ranges } if ranges.is_empty() => Work::Nothing,
            Kind::Zero { ranges } => Work::Zero(ranges),
            Kind::Flush => Work::Flush,
            Kind::GetId { len, data } => Work::GetId { len, data },
        };
        job
    }

    /// One engine submission for every job that has I/O to do.
    fn submit(&self, jobs: &mut [Job], write_through: bool) {
        let mut ops = Vec::with_capacity(jobs.len() + 1);
        let mut owners = Vec::with_capacity(jobs.len() + 1);
        let mut modified = false;
        for (i, job) in jobs.iter_mut().enumerate() {
            if job.error.is_some() {
                continue;
            }
            modified |= job.work.modifies();
            match &mut job.work {
                Work::Read { block, buf, .. } => {
                    ops.push(Op::Read {
                        block: *block,
                        buf: buf.as_mut_slice(),
                    });
                    owners.push(Some(i));
                }
                Work::Write { block, buf } => {
                    ops.push(Op::Write {
                        block: *block,
                        data: buf.as_slice(),
                    });
                    owners.push(Some(i));
                }
                Work::Zero(ranges) => {
                    for &(block, count) in ranges.iter() {
                        ops.push(Op::Zero { block, count });
                        owners.push(Some(i));
                    }
                }
                Work::Flush => {
                    ops.push(Op::Flush);
                    owners.push(Some(i));
                }
                Work::Nothing | Work::GetId { .. } => {}
            }
        }
        if ops.is_empty() {
            return;
        }
        // Write-through: one trailing flush makes the whole batch durable;
        // if it fails, every write of the batch fails.
        let trailing_flush = write_through && modified;
        if trailing_flush {
            ops.push(Op::Flush);
            owners.push(None);
        }
        let n = ops.len();
        let mut results = self.engine.submit(&mut ops).into_iter();
        drop(ops);
        let mut flush_failed = false;
        for owner in owners.iter().take(n) {
            let r = results.next().unwrap_or_else(|| {
                Err(EngineError::Io {
                    what: "completing a batch",
                    source: std::io::Error::other("the engine returned too few results"),
                })
            });
            let Err(e) = r else { continue };
            match owner {
                Some(i) => {
                    if let Some(job) = jobs.get_mut(*i) {
                        job.error.get_or_insert(RequestError::Engine(e));
                    }
                }
                None => {
                    self.warn(format_args!("write-through flush failed: {e}"));
                    flush_failed = true;
                }
            }
        }
        if flush_failed {
            for job in jobs.iter_mut().filter(|j| j.work.modifies()) {
                job.error
                    .get_or_insert(RequestError::Engine(EngineError::Io {
                        what: "flushing a write-through batch",
                        source: std::io::Error::other("flush failed"),
                    }));
            }
        }
    }

    /// Copy results to the guest, write the status byte, report the used length.
    fn finish<M: GuestMemory + ?Sized>(&self, mem: &M, mut job: Job) -> Used {
        let mut written = 0u32;
        if job.error.is_none() {
            let out = match &job.work {
                Work::Read { buf, data, .. } => Some((buf.as_slice(), data)),
                Work::GetId { len, data } => Some((&self.serial[..*len], data)),
                _ => None,
            };
            if let Some((bytes, data)) = out {
                match scatter(mem, data, bytes) {
                    // Bounded by the chain length, which virtio keeps below 4 GiB.
                    Ok(()) => written = bytes.len() as u32,
                    Err(e) => job.error = Some(e),
                }
            }
        }
        let Some(status_addr) = job.status else {
            if let Some(e) = &job.error {
                self.warn(format_args!("dropping request {}: {e}", job.head));
            }
            return Used {
                head: job.head,
                len: 0,
            };
        };
        let status = match &job.error {
            None => VIRTIO_BLK_S_OK as u8,
            Some(e) => {
                self.log_failure(job.head, e);
                status_of(e)
            }
        };
        if let Err(e) = mem.write_slice(&[status], status_addr) {
            self.warn(format_args!(
                "request {}: cannot write status: {e}",
                job.head
            ));
            return Used {
                head: job.head,
                len: 0,
            };
        }
        Used {
            head: job.head,
            len: written.saturating_add(1),
        }
    }

    fn log_failure(&self, head: u16, e: &RequestError) {
        match e {
            // The engine has logged the block and counted it.
            RequestError::Engine(EngineError::Mismatch { block }) => {
                log::debug!("request {head}: read of block {block} failed verification")
            }
            _ => self.warn(format_args!("request {head} failed: {e}")),
        }
    }
}
