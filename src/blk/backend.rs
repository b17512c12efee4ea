//! The vhost-user backend: one per front-end connection, over the shared
//! [`Disk`].
//!
//! Each queue has its own worker thread (`queues_per_thread` gives one
//! queue per thread), so the backend uses the shared-reference trait and
//! only per-queue state is locked: queues run in parallel and meet only in
//! the engine, whose group commit spans them.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{self, ConfigSpace};
use super::execute::{BufPool, Disk};
use super::request::{ParseError, Request, RequestError};
use crate::integrity::EngineError;
use crate::io::volatile::PowerSupply;

/// Guest memory as the vhost-user crates share it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type of [`BlkBackend`].
pub type Vring = VringRwLock<GuestMem>;

/// Most queues one backend serves: `queues_per_thread` is a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;

/// The backend of one front-end connection.
pub struct BlkBackend {
    disk: Arc<Disk>,
    mem: GuestMem,
    num_queues: usize,
    max_queue_size: usize,
    config: Mutex<ConfigSpace>,
    event_idx: AtomicBool,
    /// Per queue: held by its worker while it runs a batch, so that
    /// stopping a ring or the connection can wait for requests in flight;
    /// it also keeps the worker's reusable buffers.
    busy: Vec<Mutex<BufPool>>,
    /// Notifiers of the workers' exit events.
    exits: Mutex<Vec<EventNotifier>>,
    /// Set once the connection is gone: workers then touch nothing.
    closed: AtomicBool,
    /// Rings the driver has started (bit per queue), to tell a device
    /// stop (all rings stopped) and a device start (a stopped ring runs).
    started: AtomicU64,
    /// With `serve --volatile-cache`: once this is off, every request
    /// fails with an I/O error.
    power: Option<Arc<PowerSupply>>,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, num_queues: u16, max_queue_size: u16, mem: GuestMem) -> Self {
        let num_queues = usize::from(num_queues.clamp(1, MAX_QUEUES));
        let l = disk.limits();
        let config = ConfigSpace::new(l.block_size, l.blocks, num_queues as u16, true);
        Self {
            disk,
            mem,
            num_queues,
            max_queue_size: usize::from(max_queue_size),
            config: Mutex::new(config),
            event_idx: AtomicBool::new(false),
            busy: (0..num_queues)
                .map(|_| Mutex::new(BufPool::default()))
                .collect(),
            exits: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            started: AtomicU64::new(0),
            power: None,
        }
    }

    /// Fail every request once `power` is switched off. The devices under
    /// the engine refuse I/O by then too, but the engine completes some
    /// requests without touching them (writes held in its write-back
    /// stage, reads served from it): a disk without power answers nothing.
    pub fn with_power(mut self, power: Arc<PowerSupply>) -> Self {
        self.power = Some(power);
        self
    }

    /// The connection is over: stop the workers and wait for the batches
    /// they are running. No request is touched afterwards.
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

    /// Drain a ring, one engine batch per pass, signalling once per pass.
    fn drain(&self, vring: &Vring, pool: &mut BufPool) -> Result<(), virtio_queue::Error> {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            // GET_VRING_BASE marks the ring not ready and then waits for us
            // (stop_vring): stop here rather than fail on a stopped ring.
            if !vring.get_ref().get_queue().ready() {
                return Ok(());
            }
            if event_idx {
                vring.disable_notification()?;
            }
            self.process(vring, pool)?;
            // With EVENT_IDX, re-enabling notifications tells us whether the
            // driver added buffers meanwhile; without it a kick will come.
            if !event_idx || !vring.enable_notification()? {
                return Ok(());
            }
        }
    }

    fn process(&self, vring: &Vring, pool: &mut BufPool) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.memory();
        let chains: Vec<_> = vring.get_mut().get_queue_mut().iter(mem.clone())?.collect();
        if chains.is_empty() {
            return Ok(());
        }
        let limits = *self.disk.limits();
        let powered = self.power.as_ref().map_or(true, |p| p.is_on());
        let parsed = chains
            .into_iter()
            .map(|c| {
                let r = Request::parse(c, &limits);
                if powered {
                    r
                } else {
                    r.and_then(|r| Err(lost_power(r)))
                }
            })
            .collect();
        let used = self.disk.run(&*mem, parsed, self.write_through(), pool);
        for u in used {
            vring.add_used(u.head, u.len)?;
        }
        if vring.needs_notification()? {
            if let Err(e) = vring.signal_used_queue() {
                self.disk.warn(format_args!("cannot signal the guest: {e}"));
            }
        }
        Ok(())
    }
}

/// The failure of a request to a disk whose simulated power was cut.
fn lost_power(r: Request) -> ParseError {
    ParseError {
        head: r.head,
        status: Some(r.status),
        error: RequestError::Engine(EngineError::Io {
            what: "serving a request",
            source: std::sync::Arc::new(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the disk has lost power",
            )),
        }),
    }
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

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // `self.mem` is the same GuestMemoryAtomic the handler updates.
        Ok(())
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
            drop(b.lock().unwrap_or_else(PoisonError::into_inner));
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
        let mut pool = busy.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) || !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        self.note_started(thread_id);
        // A broken ring is the guest's problem; returning an error here
        // would end the worker thread for good.
        if let Err(e) = self.drain(vring, &mut pool) {
            self.disk.warn(format_args!(
                "queue {thread_id}: cannot process the ring: {e}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_F_RO, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
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
        let backend = BlkBackend::new(disk.clone(), 2, 256, gm.clone());
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
