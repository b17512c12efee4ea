//! Large reads of one ring pass split over two threads.
//!
//! A queue's worker verifies every block it reads and copies it to the
//! guest: for large sequential reads that is about one core of memory
//! traffic, so one queue alone could use only one of the host's cores.
//! Requests of a pass have no order among them (virtio), so the worker
//! hands part of a pass of large reads to a helper and does the rest
//! itself — but only while a core is idle: with every core busy serving
//! queues already, a hand-off only adds switches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use log::warn;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// Threads busy now: queue workers draining their ring (polling
/// included) and helpers running their half.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// A busy thread: counted in [`ACTIVE`] while it lives.
pub struct Busy(());

impl Busy {
    pub fn enter() -> Self {
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        Busy(())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The helpers every disk and queue share, or `None` on a single core (or
/// if they could not be started: then everything runs on the worker).
fn pool() -> Option<&'static ThreadPool> {
    static POOL: OnceLock<Option<ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        if cores() < 2 {
            return None;
        }
        ThreadPoolBuilder::new()
            .num_threads(cores())
            .thread_name(|i| format!("twinsum-read-{i}"))
            .build()
            .inspect_err(|e| warn!("cannot start read helpers, reads stay on their queue: {e}"))
            .ok()
    })
    .as_ref()
}

/// Run `a` on this thread and `b` on a helper if a core is idle (the
/// caller holds a [`Busy`]), else both here; return both results.
pub fn join<RA, RB>(a: impl FnOnce() -> RA, b: impl FnOnce() -> RB + Send) -> (RA, RB)
where
    RB: Send,
{
    let pool = pool().filter(|_| ACTIVE.load(Ordering::Relaxed) < cores());
    let Some(pool) = pool else {
        return (a(), b());
    };
    let mut rb = None;
    let ra = pool.in_place_scope(|s| {
        s.spawn(|_| {
            let _busy = Busy::enter();
            rb = Some(b());
        });
        a()
    });
    // The scope returns only after `b` ran (a panic in it is re-raised).
    (ra, rb.expect("the helper ran"))
}
