//! The vhost-user backend: one per front-end connection, over the shared
//! [`Disk`].
//!
//! Each queue has its own worker thread (`queues_per_thread` gives one
//! queue per thread), so the backend uses the shared-reference trait and
//! only per-queue state is locked: queues run in parallel and meet only in
//! the engine, whose group commit spans them.
//!
//! The workers see guest memory only through the backend's own
//! [`GuestMem`], which [`BlkBackend::update_memory`] fills once a new
//! memory table has been checked against its files and made known to the
//! SIGBUS handler ([`guestmem`]). The vhost-user handler publishes a new
//! table to the rings before it tells the backend, so the workers do every
//! ring access through the queue with that checked memory, never through
//! the vring's own.
//!
//! Requests complete in the order the driver made them available, on
//! every queue: QEMU rewinds a ring to its used index when the back-end
//! dies, which is only right if every request before that index is done.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, Permissions,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::chain::DescTable;
use super::config::{self, ConfigSpace};
use super::execute::{BufPool, Disk, Used};
use super::fanout;
use super::guestmem;
use super::inplace;
use super::request::{Kind, ParseError, Request, Segment};

/// Guest memory as the vhost-user crates share it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type of [`BlkBackend`].
pub type Vring = VringRwLock<GuestMem>;

/// Requests of about this many data bytes complete together (see
/// [`BlkBackend::process`]); a ring of 4 KiB requests stays one batch.
const GROUP_BYTES: usize = 256 << 10;

/// How long a worker watches its ring after a drain before it sleeps.
/// Waking a sleeping worker costs tens of microseconds on a virtual
/// machine (an IPI and a context switch), more than a 4 KiB request takes
/// to serve: a driver that queues its next request within this window
/// (a QD1 reader, a deep queue refilled as completions arrive) finds the
/// worker awake and need not kick. QEMU's iothreads poll the same way
/// (`poll-max-ns`, 32 µs by default). An idle ring costs one window.
const POLL: Duration = Duration::from_micros(32);

/// Most queues one backend serves: `queues_per_thread` is a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;

/// Why a queue cannot be served at all (as opposed to one request).
#[derive(Debug, thiserror::Error)]
enum Stall {
    #[error("its {what} ({addr:#x}+{len}) is not inside guest memory")]
    Ring {
        what: &'static str,
        addr: u64,
        len: usize,
    },
    #[error(transparent)]
    Queue(#[from] virtio_queue::Error),
}

/// What a queue's worker keeps between batches.
#[derive(Default)]
struct Worker {
    pool: BufPool,
    /// Why the queue is stuck, once that was logged.
    stalled: Option<String>,
}

/// The backend of one front-end connection.
pub struct BlkBackend {
    disk: Arc<Disk>,
    /// Guest memory as the workers see it: only tables that passed
    /// [`guestmem::check_table`].
    mem: GuestMem,
    num_queues: usize,
    max_queue_size: usize,
    config: Mutex<ConfigSpace>,
    event_idx: AtomicBool,
    /// Per queue: held by its worker while it runs a batch, so that
    /// stopping a ring or the connection can wait for requests in flight;
    /// it also keeps the worker's reusable buffers.
    busy: Vec<Mutex<Worker>>,
    /// Notifiers of the workers' exit events.
    exits: Mutex<Vec<EventNotifier>>,
    /// Set once the connection is gone: workers then touch nothing.
    closed: AtomicBool,
    /// Rings the driver has started (bit per queue), to tell a device
    /// stop (all rings stopped) and a device start (a stopped ring runs).
    started: AtomicU64,
}

impl BlkBackend {
    /// A backend with no guest memory yet (SET_MEM_TABLE brings it).
    pub fn new(disk: Arc<Disk>, num_queues: u16, max_queue_size: u16) -> Self {
        let num_queues = usize::from(num_queues.clamp(1, MAX_QUEUES));
        let l = disk.limits();
        let config = ConfigSpace::new(l.block_size, l.blocks, num_queues as u16, true);
        Self {
            disk,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            num_queues,
            max_queue_size: usize::from(max_queue_size),
            config: Mutex::new(config),
            event_idx: AtomicBool::new(false),
            busy: (0..num_queues)
                .map(|_| Mutex::new(Worker::default()))
                .collect(),
            exits: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            started: AtomicU64::new(0),
        }
    }

    /// The connection is over (or an orderly stop is about to cut it):
    /// stop the workers and wait for the batches they are running, which
    /// complete on the ring. No request is touched afterwards.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for n in self
            .exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            if let Err(e) = n.notify() {
                log::warn!("cannot stop a queue worker: {e}");
            }
        }
        for b in &self.busy {
            drop(b.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    fn write_through(&self) -> bool {
        let c = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        c.writeback == 0
    }

    /// First activity on a ring since the connection began or the ring was
    /// stopped: the driver (re)started the device.
    fn note_started(&self, queue: usize) {
        let bit = 1u64 << queue;
        let before = self.started.fetch_or(bit, Ordering::AcqRel);
        if before & bit == 0 {
            log::debug!("queue {queue} started");
            self.disk.leave_sync_mode("the driver started the device");
        }
    }

    /// Drain a ring pass by pass, signalling once per completion group.
    fn drain(&self, vring: &Vring, pool: &mut BufPool) -> Result<(), Stall> {
        // Polling for more counts as busy: a worker that will be back in a
        // moment needs its core.
        let _busy = fanout::Busy::enter();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            // GET_VRING_BASE marks the ring not ready and then waits for us
            // (stop_vring): stop here rather than fail on a stopped ring.
            // An orderly stop waits for this pass and takes nothing more.
            if self.closed.load(Ordering::Acquire) || !vring.get_ref().get_queue().ready() {
                return Ok(());
            }
            let mem = self.mem.memory();
            if event_idx {
                let mut st = vring.get_mut();
                let q = st.get_queue_mut();
                check_rings(&*mem, q)?;
                q.disable_notification(&*mem)?;
            }
            let done = self.process(vring, pool);
            if !event_idx {
                return done;
            }
            if done.is_ok() && self.poll_for_more(vring, &mem) {
                continue;
            }
            // With EVENT_IDX, re-enabling notifications tells us whether the
            // driver added buffers meanwhile; without it a kick will come.
            // Re-enabled even after a failure: with a stale avail_event the
            // driver would never kick a repaired ring.
            let more = vring.get_mut().get_queue_mut().enable_notification(&*mem);
            done?;
            if !more? {
                return Ok(());
            }
        }
    }

    /// Watch the ring for up to [`POLL`] for the driver to make more
    /// requests available, its notifications still off; whether it did.
    fn poll_for_more(&self, vring: &Vring, mem: &GuestMemoryMmap) -> bool {
        let start = Instant::now();
        loop {
            {
                let st = vring.get_ref();
                let q = st.get_queue();
                if !q.ready() {
                    return false;
                }
                match q.avail_idx(mem, Ordering::Acquire) {
                    Ok(idx) if idx.0 != q.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            if start.elapsed() >= POLL || self.closed.load(Ordering::Acquire) {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn process(&self, vring: &Vring, pool: &mut BufPool) -> Result<(), Stall> {
        let mem = self.mem.memory();
        let (table, heads) = {
            let mut st = vring.get_mut();
            let q = st.get_queue_mut();
            check_rings(&*mem, q)?;
            let table = DescTable {
                addr: GuestAddress(q.desc_table()),
                size: q.size(),
            };
            let heads: Vec<u16> = q.iter(&*mem)?.map(|c| c.head_index()).collect();
            (table, heads)
        };
        if heads.is_empty() {
            return Ok(());
        }
        let limits = *self.disk.limits();
        let parsed: Vec<_> = heads
            .into_iter()
            .map(|head| Request::parse(&*mem, table, head, &limits))
            .collect();
        // In avail order, and added to the used ring in that order, a
        // group at a time: the driver gets the first requests of a long
        // batch of large ones back (and can queue more) while the rest run.
        // Every popped request runs and completes even after a group
        // stalled: the ring has moved past them.
        let write_through = self.write_through();
        let mut stall = None;
        let mut first = parsed;
        let second = match read_split(&*mem, &first) {
            Some(cut) => first.split_off(cut),
            None => Vec::new(),
        };
        let guest: &GuestMemoryMmap = &mem;
        let mut complete = |used| {
            if let Err(e) = self.complete(vring, guest, table, used) {
                stall.get_or_insert(e);
            }
        };
        if second.is_empty() {
            run_groups(&self.disk, guest, first, write_through, pool, &mut complete);
        } else {
            // A pass of large reads: a helper runs its second half
            // meanwhile (`fanout`); its groups complete after the first
            // half's.
            let mut spare = pool.split();
            let disk = &self.disk;
            let (_, groups) = fanout::join(
                || run_groups(disk, guest, first, write_through, pool, &mut complete),
                || {
                    let mut groups = Vec::new();
                    run_groups(disk, guest, second, write_through, &mut spare, &mut |u| {
                        groups.push(u)
                    });
                    groups
                },
            );
            pool.merge(spare);
            groups.into_iter().for_each(complete);
        }
        stall.map_or(Ok(()), Err)
    }

    /// Log newly poisoned guest memory, add `used` to the ring in order,
    /// and signal the driver if it wants to know.
    fn complete(
        &self,
        vring: &Vring,
        mem: &GuestMemoryMmap,
        table: DescTable,
        used: Vec<Used>,
    ) -> Result<(), Stall> {
        for (addr, len) in guestmem::newly_poisoned(mem) {
            log::error!(
                "guest memory {:#x}+{len:#x} faulted: the file behind it shrank; requests \
                 touching it fail until the front-end sends a new memory table",
                addr.0
            );
        }

        let mut st = vring.get_mut();
        let q = st.get_queue_mut();
        let mut added = 0usize;
        let mut stall = None;
        // Every request that ran is completed, whatever happens to the
        // others: one failed add_used must not lose the rest of the batch.
        for u in used {
            // A head past the table has no used-ring identity; its refusal
            // was logged when it was parsed.
            if u.head >= table.size {
                continue;
            }
            match q.add_used(mem, u.head, u.len) {
                Ok(()) => added += 1,
                Err(e) => {
                    stall.get_or_insert(e);
                }
            }
        }
        if added > 0 && q.needs_notification(mem)? {
            if let Err(e) = st.signal_used_queue() {
                self.disk.warn(format_args!("cannot signal the guest: {e}"));
            }
        }
        match stall {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Run `parsed` a completion group at a time, handing each group's
/// completions to `each` in order.
fn run_groups(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    parsed: Vec<Result<Request, ParseError>>,
    write_through: bool,
    pool: &mut BufPool,
    each: &mut dyn FnMut(Vec<Used>),
) {
    let mut rest = parsed.into_iter();
    while rest.len() > 0 {
        let n = group_end(rest.as_slice());
        let group = rest.by_ref().take(n).collect();
        each(disk.run(mem, group, write_through, pool));
    }
}

/// A pass whose reads add up to this many bytes is split over two threads;
/// below it a hand-off costs more than it saves (4 KiB random reads stay
/// on their worker).
const SPLIT_BYTES: usize = 512 << 10;

/// Where to cut a pass so both halves read about as many bytes, if it is
/// worth splitting: at least two reads and [`SPLIT_BYTES`], and nothing
/// but reads (writes, zeroes and flushes keep their order in one thread).
fn read_split<M: GuestMemory + ?Sized>(
    mem: &M,
    parsed: &[Result<Request, ParseError>],
) -> Option<usize> {
    let mut total = 0;
    let mut reads = 0;
    for r in parsed.iter().flatten() {
        match r.kind {
            Kind::Read { len, .. } => {
                total += len;
                reads += 1;
            }
            Kind::GetId { .. } => {}
            _ => return None,
        }
    }
    if reads < 2 || total < SPLIT_BYTES {
        return None;
    }
    let mut seen = 0;
    parsed
        .iter()
        .position(|p| {
            seen += p.as_ref().map_or(0, Request::data_len);
            seen * 2 >= total
        })
        .map(|i| i + 1)
        .filter(|&cut| cut < parsed.len())
        // Each half claims its in-place buffers on its own thread.
        .filter(|&cut| {
            !inplace::share_memory(
                mem,
                &read_buffers(&parsed[..cut]),
                &read_buffers(&parsed[cut..]),
            )
        })
}

/// The guest buffers of the reads among `parsed`.
fn read_buffers(parsed: &[Result<Request, ParseError>]) -> Vec<&[Segment]> {
    parsed
        .iter()
        .flatten()
        .filter_map(|r| match &r.kind {
            Kind::Read { data, .. } => Some(data.as_slice()),
            _ => None,
        })
        .collect()
}

/// Where the first completion group of `parsed` ends: after about
/// [`GROUP_BYTES`] of data, so small requests still run as one batch.
fn group_end(parsed: &[Result<Request, ParseError>]) -> usize {
    let mut bytes = 0;
    for (i, p) in parsed.iter().enumerate() {
        bytes += p.as_ref().map_or(0, Request::data_len);
        if bytes >= GROUP_BYTES {
            return i + 1;
        }
    }
    parsed.len()
}

/// The rings of `q` must lie in guest memory before anything touches them
/// (virtio-queue would log every failed access, at the guest's pace).
fn check_rings<M: GuestMemory + ?Sized>(mem: &M, q: &Queue) -> Result<(), Stall> {
    let n = usize::from(q.size());
    for (what, addr, len, access) in [
        (
            "descriptor table",
            q.desc_table(),
            16 * n,
            Permissions::Read,
        ),
        (
            "available ring",
            q.avail_ring(),
            6 + 2 * n,
            Permissions::Read,
        ),
        ("used ring", q.used_ring(), 6 + 8 * n, Permissions::Write),
    ] {
        if !mem.check_range(GuestAddress(addr), len, access) {
            return Err(Stall::Ring { what, addr, len });
        }
    }
    Ok(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        config::features(self.disk.readonly()) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        log::debug!("front-end acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        for b in &self.busy {
            drop(b.lock().unwrap_or_else(PoisonError::into_inner));
        }
        self.started.store(0, Ordering::Release);
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .writeback = 1;
        self.disk.enter_sync_mode("device reset");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        c.read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if let Some(wce) = ConfigSpace::writeback_from(offset, buf) {
            let mut c = self.config.lock().unwrap_or_else(PoisonError::into_inner);
            c.writeback = u8::from(wce);
            log::info!(
                "driver set the write cache to {}",
                if wce { "write-back" } else { "write-through" }
            );
        }
        Ok(())
    }

    /// `mem` is the handler's memory, which already holds the new table:
    /// check it before the workers get it, and put the old one back if it
    /// is refused (the handler then ends the connection and logs why).
    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        let new = mem.memory();
        let known = self.mem.memory();
        match guestmem::register(&new).and_then(|()| guestmem::check_table(&new, &known)) {
            Ok(()) => {
                log::debug!("memory table of {} region(s)", new.num_regions());
                self.mem
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .replace((*new).clone());
                Ok(())
            }
            Err(e) => {
                mem.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .replace((*known).clone());
                Err(io::Error::new(io::ErrorKind::InvalidInput, e))
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
                Ok(pair) => pair,
                Err(e) => {
                    log::error!("cannot create a worker exit event: {e}");
                    return None;
                }
            };
        match notifier.try_clone() {
            Ok(n) => self
                .exits
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(n),
            Err(e) => log::error!("cannot keep a worker exit event: {e}"),
        }
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        // Wait for the batch in flight on this ring (GET_VRING_BASE must
        // not return while we still complete requests).
        if let Some(b) = self.busy.get(q) {
            // A ring set up again gets its stall logged again.
            b.lock().unwrap_or_else(PoisonError::into_inner).stalled = None;
        }
        let bit = 1u64.checked_shl(queue_index).unwrap_or(0);
        let before = self.started.fetch_and(!bit, Ordering::AcqRel);
        if before & bit != 0 && before & !bit == 0 {
            self.disk.enter_sync_mode("all queues stopped");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread: the event index is the thread's only ring
        // and the thread index is the queue index.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let Some(busy) = self.busy.get(thread_id) else {
            return Ok(());
        };
        let mut worker = busy.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) || !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        self.note_started(thread_id);
        // A broken ring is the guest's problem; returning an error here
        // would end the worker thread for good. It stops the queue, so it
        // is always logged — once, not at every kick the guest sends.
        let Worker { pool, stalled } = &mut *worker;
        match self.drain(vring, pool) {
            Ok(()) => {
                if stalled.take().is_some() {
                    log::info!("queue {thread_id}: the ring works again");
                }
            }
            Err(e) => {
                let why = e.to_string();
                if stalled.as_deref() == Some(why.as_str()) {
                    log::debug!("queue {thread_id} is still stuck: {why}");
                } else {
                    log::error!(
                        "queue {thread_id} is stuck: {why}; nothing more is served on it until \
                         the driver repairs or resets the ring"
                    );
                    *stalled = Some(why);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_F_RO, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::blk::testutil::*;

    struct Fixture {
        disk: Arc<Disk>,
        gm: GuestMem,
        backend: BlkBackend,
        vring: Vring,
    }

    fn fixture(readonly: bool) -> Fixture {
        let (_data, disk) = mem_disk(readonly);
        let disk = Arc::new(disk);
        let gm = GuestMemoryAtomic::new(guest_memory());
        let backend = BlkBackend::new(disk.clone(), 2, 256);
        backend.update_memory(gm.clone()).unwrap();
        let vring = Vring::new(gm.clone(), 256).unwrap();
        Fixture {
            disk,
            gm,
            backend,
            vring,
        }
    }

    impl Fixture {
        /// Put `reqs` on a fresh ring as queue 0 and let the worker run it.
        fn kick(&self, reqs: &[Req]) {
            let mem = self.gm.memory();
            let vq = MockSplitQueue::new(&*mem, 256);
            vq.add_desc_chains(&descriptors(&mem, reqs), 0).unwrap();
            self.vring.set_queue_size(256);
            self.vring
                .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                .unwrap();
            self.vring.set_queue_next_avail(0);
            self.vring.set_queue_next_used(0);
            self.vring.set_queue_ready(true);
            self.vring.set_enabled(true);
            self.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
            assert_eq!(
                self.vring.queue_used_idx().unwrap(),
                reqs.len() as u16,
                "every request is completed"
            );
        }

        /// Point queue 0 at `vq`'s rings and let the worker drain it.
        fn run_ring(&self, vq: &MockSplitQueue<GuestMemoryMmap>) {
            self.vring.set_queue_size(256);
            self.vring
                .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                .unwrap();
            self.vring.set_queue_next_avail(0);
            self.vring.set_queue_next_used(0);
            self.vring.set_queue_ready(true);
            self.vring.set_enabled(true);
            self.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
        }

        fn sync_mode(&self) -> bool {
            self.disk.engine().sync_mode()
        }
    }

    #[test]
    fn a_worker_drains_its_ring_with_and_without_event_idx() {
        for event_idx in [false, true] {
            let f = fixture(false);
            f.backend.set_event_idx(event_idx);
            f.vring.set_queue_event_idx(event_idx);
            let mem = f.gm.memory();
            fill_buf(&mem, 0, 0x5a, 4096);
            f.kick(&[
                req(VIRTIO_BLK_T_OUT, 8, 4096),
                req(VIRTIO_BLK_T_FLUSH, 0, 0),
            ]);
            assert_eq!((status_byte(&mem, 0), status_byte(&mem, 1)), (0, 0));
            fill_buf(&mem, 0, 0, 4096);
            f.kick(&[req(VIRTIO_BLK_T_IN, 8, 4096)]);
            assert_eq!(status_byte(&mem, 0), 0);
            assert_eq!(read_buf(&mem, 0, 4096), vec![0x5a; 4096]);
        }
    }

    #[test]
    fn a_ring_of_large_reads_completes_in_groups_each_signalled() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        // The driver hears of the first reads of a long batch before the
        // last ones run, so it can queue more meanwhile; 4 KiB requests
        // stay one batch with one signal.
        let f = fixture(false);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let theirs = call.try_clone().unwrap().into_raw_fd();
        // SAFETY: a fresh descriptor nothing else owns.
        f.vring
            .set_call(Some(unsafe { std::fs::File::from_raw_fd(theirs) }));
        let len = 64 << 10;
        let large = (GROUP_BYTES / len as usize) as u64 + 1;
        let reqs: Vec<Req> = (0..large)
            .map(|k| req(VIRTIO_BLK_T_IN, (k % 4) * 128, len))
            .collect();
        f.kick(&reqs);
        let mem = f.gm.memory();
        assert!((0..large).all(|k| status_byte(&mem, k) == 0));
        assert_eq!(call.read().unwrap(), 2, "one signal per group");

        let small: Vec<Req> = (0..32).map(|k| req(VIRTIO_BLK_T_IN, k * 8, 4096)).collect();
        f.kick(&small);
        assert_eq!(call.read().unwrap(), 1, "small requests complete together");
    }

    #[test]
    fn a_pass_of_large_reads_split_over_two_threads_reads_every_block_right() {
        // Past SPLIT_BYTES a helper runs the second half of the pass; each
        // request must still get its own blocks and its status.
        let f = fixture(false);
        let mem = f.gm.memory();
        let len = 64 << 10;
        let sectors = |k: u64| (k % 4) * 128;
        let writes: Vec<Req> = (0..4)
            .map(|k| req(VIRTIO_BLK_T_OUT, sectors(k), len))
            .collect();
        for k in 0..4 {
            fill_buf(&mem, k, 0x10 + k as u8, len as usize);
        }
        f.kick(&writes);
        let n = (SPLIT_BYTES / len as usize) as u64 + 2;
        let reads: Vec<Req> = (0..n)
            .map(|k| req(VIRTIO_BLK_T_IN, sectors(k), len))
            .collect();
        assert!(
            read_split(&*mem, &parse(&mem, &reads)).is_some(),
            "the pass is split"
        );
        for _ in 0..8 {
            for k in 0..n {
                fill_buf(&mem, k, 0, len as usize);
            }
            f.kick(&reads);
            for k in 0..n {
                assert_eq!(status_byte(&mem, k), 0, "request {k}");
                let want = vec![0x10 + (k % 4) as u8; len as usize];
                assert!(
                    read_buf(&mem, k, len as usize) == want,
                    "request {k}'s data"
                );
            }
        }
    }

    /// The requests `reqs` as the backend parses them.
    fn parse(mem: &GuestMemoryMmap, reqs: &[Req]) -> Vec<Result<Request, ParseError>> {
        let vq = MockSplitQueue::new(mem, 256);
        vq.add_desc_chains(&descriptors(mem, reqs), 0).unwrap();
        parse_ring(mem, &vq, &config::limits(BS, BLOCKS))
    }

    #[test]
    fn only_passes_of_large_reads_and_nothing_else_are_split() {
        let f = fixture(false);
        let mem = f.gm.memory();
        let big = |n: u64, len: u32| {
            (0..n)
                .map(|k| req(VIRTIO_BLK_T_IN, k * 8, len))
                .collect::<Vec<_>>()
        };
        // Eight 64 KiB reads: the cut falls after the fourth (half the bytes).
        assert_eq!(read_split(&*mem, &parse(&mem, &big(8, 64 << 10))), Some(4));
        // A ring of 4 KiB reads stays on its worker.
        assert_eq!(read_split(&*mem, &parse(&mem, &big(32, 4096))), None);
        // A write or a flush keeps the pass in one thread.
        let mut with_write = big(8, 64 << 10);
        with_write.push(req(VIRTIO_BLK_T_OUT, 0, 4096));
        assert_eq!(read_split(&*mem, &parse(&mem, &with_write)), None);
        let mut with_flush = big(8, 64 << 10);
        with_flush.insert(3, req(VIRTIO_BLK_T_FLUSH, 0, 0));
        assert_eq!(read_split(&*mem, &parse(&mem, &with_flush)), None);
        assert_eq!(read_split(&*mem, &[]), None);
        // Two reads, one in each half, into the same guest bytes: each
        // half would claim them in place on its own thread.
        let mut shared = parse(&mem, &big(8, 64 << 10));
        let first = match &shared[0] {
            Ok(Request {
                kind: Kind::Read { data, .. },
                ..
            }) => data.clone(),
            other => panic!("not a read: {other:?}"),
        };
        if let Ok(Request {
            kind: Kind::Read { data, .. },
            ..
        }) = &mut shared[6]
        {
            *data = first;
        }
        assert_eq!(read_split(&*mem, &shared), None);
    }

    #[test]
    fn watching_the_ring_sees_requests_made_available_after_a_drain() {
        let f = fixture(false);
        let mem = f.gm.memory();
        let vq = MockSplitQueue::new(&*mem, 256);
        let first = descriptors(&mem, &[req(VIRTIO_BLK_T_IN, 0, 4096)]);
        vq.add_desc_chains(&first, 0).unwrap();
        f.run_ring(&vq);
        assert_eq!(f.vring.queue_used_idx().unwrap(), 1);
        assert!(!f.backend.poll_for_more(&f.vring, &mem), "nothing new");
        let next = descriptors(&mem, &[req(VIRTIO_BLK_T_IN, 8, 4096)]);
        vq.add_desc_chains(&next, first.len() as u16).unwrap();
        assert!(f.backend.poll_for_more(&f.vring, &mem), "a new request");
        f.vring.set_queue_ready(false);
        assert!(!f.backend.poll_for_more(&f.vring, &mem), "a stopped ring");
    }

    #[test]
    fn group_boundaries_follow_the_data_bytes() {
        let f = fixture(false);
        let mem = f.gm.memory();
        let kinds = [
            req(VIRTIO_BLK_T_FLUSH, 0, 0),
            req(VIRTIO_BLK_T_IN, 0, 64 << 10),
            req(VIRTIO_BLK_T_OUT, 0, 64 << 10),
            req(VIRTIO_BLK_T_IN, 0, 64 << 10),
            req(VIRTIO_BLK_T_IN, 0, 64 << 10),
            req(VIRTIO_BLK_T_IN, 0, 4096),
        ];
        let vq = MockSplitQueue::new(&*mem, 256);
        vq.add_desc_chains(&descriptors(&mem, &kinds), 0).unwrap();
        let parsed = parse_ring(&mem, &vq, f.disk.limits());
        assert_eq!(group_end(&parsed), 5, "cut after 256 KiB of data");
        assert_eq!(group_end(&parsed[5..]), 1, "the tail is one group");
        assert_eq!(group_end(&[]), 0);
    }

    #[test]
    fn completions_follow_the_avail_order_whatever_the_requests() {
        // QEMU rewinds a ring to its used index when the back-end dies:
        // that is only right if requests complete in avail order.
        let f = fixture(false);
        let mem = f.gm.memory();
        for k in 0..10 {
            fill_buf(&mem, k, 0x30 + k as u8, 8192);
        }
        let reqs = [
            req(VIRTIO_BLK_T_OUT, 0, 8192),
            req(VIRTIO_BLK_T_IN, 64, 4096),
            req(VIRTIO_BLK_T_FLUSH, 0, 0),
            req(2, 0, 0), // SCSI: unsupported
            req(VIRTIO_BLK_T_OUT, 16, 4096),
            req(VIRTIO_BLK_T_IN, BLOCKS * 8, 4096), // past the end
            req(VIRTIO_BLK_T_IN, 128, 8192),
            req(VIRTIO_BLK_T_OUT, 8, 1000), // not whole blocks
            req(VIRTIO_BLK_T_FLUSH, 0, 0),
        ];
        let vq = MockSplitQueue::new(&*mem, 256);
        let descs = descriptors(&mem, &reqs);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        // Each chain starts where the previous one ended; after them, a
        // malformed chain (a descriptor linked to itself).
        let mut heads = Vec::new();
        let mut next = 0u16;
        for r in &reqs {
            heads.push(next);
            next += 2 + u16::from(r.len > 0);
        }
        let looped = RawDescriptor::from(SplitDescriptor::new(
            hdr(9),
            16,
            VRING_DESC_F_NEXT as u16,
            next,
        ));
        vq.desc_table().store(next, looped).unwrap();
        heads.push(next);
        // Made available in an order that is neither table nor type order.
        let order: Vec<u16> = [6, 2, 9, 0, 7, 3, 8, 1, 5, 4]
            .iter()
            .map(|&k| heads[k])
            .collect();
        for (slot, h) in order.iter().enumerate() {
            vq.avail()
                .ring()
                .ref_at(slot)
                .unwrap()
                .store(u16::to_le(*h));
        }
        vq.avail().idx().store(u16::to_le(order.len() as u16));
        f.run_ring(&vq);

        assert_eq!(f.vring.queue_used_idx().unwrap(), order.len() as u16);
        let used: Vec<_> = (0..order.len())
            .map(|n| vq.used().ring().ref_at(n).unwrap().load())
            .collect();
        assert_eq!(
            used.iter().map(|u| u.id() as u16).collect::<Vec<_>>(),
            order,
            "used ring order is avail order"
        );
        let status: Vec<u8> = (0..9).map(|k| status_byte(&mem, k)).collect();
        assert_eq!(status, [0, 0, 0, 2, 0, 1, 0, 1, 0]);
        assert_eq!(used[2].len(), 0, "the malformed chain has no status");
    }

    #[test]
    fn stopping_every_started_ring_or_a_reset_enters_sync_mode_and_a_start_leaves_it() {
        let f = fixture(false);
        f.kick(&[req(VIRTIO_BLK_T_FLUSH, 0, 0)]);
        assert!(!f.sync_mode());
        // Queue 1 never started, so stopping queue 0 stops the device.
        f.backend.stop_vring(1).unwrap();
        assert!(!f.sync_mode(), "a ring that never ran is no signal");
        f.backend.stop_vring(0).unwrap();
        assert!(f.sync_mode(), "GET_VRING_BASE on every running ring");
        f.kick(&[req(VIRTIO_BLK_T_FLUSH, 0, 0)]);
        assert!(!f.sync_mode(), "the driver started the device again");
        f.backend.reset_device();
        assert!(f.sync_mode(), "RESET_DEVICE");
        f.kick(&[req(VIRTIO_BLK_T_FLUSH, 0, 0)]);
        assert!(!f.sync_mode());
    }

    #[test]
    fn a_closed_connection_processes_nothing() {
        let f = fixture(false);
        f.backend.close();
        let mem = f.gm.memory();
        let vq = MockSplitQueue::new(&*mem, 256);
        vq.add_desc_chains(&descriptors(&mem, &[req(VIRTIO_BLK_T_FLUSH, 0, 0)]), 0)
            .unwrap();
        f.vring.set_queue_size(256);
        f.vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        f.vring.set_queue_ready(true);
        f.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&f.vring), 0)
            .unwrap();
        assert_eq!(f.vring.queue_used_idx().unwrap(), 0);
    }

    #[test]
    fn features_config_and_threads_match_the_disk() {
        let f = fixture(true);
        assert_ne!(f.backend.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(
            f.backend.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert!(f
            .backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        assert_eq!(f.backend.queues_per_thread(), vec![1, 2]);
        let cap = f.backend.get_config(0, 8);
        assert_eq!(cap, (BLOCKS * u64::from(BS) / 512).to_le_bytes());
        assert!(f.backend.get_config(0, 1000).is_empty());
        // The driver turns the write cache off and reads it back.
        f.backend.set_config(32, &[0]).unwrap();
        assert_eq!(f.backend.get_config(32, 1), vec![0]);
        f.backend.reset_device();
        assert_eq!(
            f.backend.get_config(32, 1),
            vec![1],
            "reset restores write-back"
        );
    }
}
