//! Large reads of one ring pass split over two threads.
//!
//! A queue's worker verifies every block it reads and copies it to the
//! guest: for large sequential reads that is about one core of memory
//! traffic, so one queue alone could use only one of the host's cores.
//! Requests of a pass have no order among them (virtio), so the worker
//! hands part of a pass of large reads to a helper and does the rest
//! itself — but only while a core is idle: with every core busy serving
//! queues already, a hand-off only adds switches.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::warn;

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

/// How long a worker that finished its half watches for the helper to
/// finish the other before it sleeps.
const HELPER_SPIN: Duration = Duration::from_micros(40);

/// Half a pass, its borrows erased: [`join`] does not return or unwind
/// before the helper has run and dropped it.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// What the worker and the helper share.
#[derive(Default)]
struct Slot {
    /// A half handed over and not yet taken.
    job: Option<Job>,
    /// A half the helper took and has not finished.
    running: bool,
    /// A worker is waiting in [`join`]: the helper takes no other job.
    owned: bool,
}

/// A helper thread that sleeps until a worker hands it half a pass.
/// Parked on a condition variable rather than spinning: on two cores a
/// spinning helper takes time from the worker and the client it serves.
struct Helper {
    slot: Mutex<Slot>,
    /// `Slot::running`, readable without the lock for a short spin.
    working: AtomicBool,
    /// Signalled when a job arrives (the helper waits) and when one is
    /// done (the worker waits).
    changed: Condvar,
}

impl Helper {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn serve(&self) {
        let mut slot = self.lock();
        loop {
            let Some(job) = slot.job.take() else {
                slot = self
                    .changed
                    .wait(slot)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            slot.running = true;
            self.working.store(true, Ordering::Release);
            drop(slot);
            {
                let _busy = Busy::enter();
                job();
            }
            self.working.store(false, Ordering::Release);
            slot = self.lock();
            slot.running = false;
            self.changed.notify_all();
        }
    }
}

/// The helpers every disk and queue share, one per core but one (each
/// worker does half of its pass itself); none on a single core, and
/// fewer if some could not be started (then more runs on the workers).
fn helpers() -> &'static [&'static Helper] {
    static HELPERS: OnceLock<Vec<&'static Helper>> = OnceLock::new();
    HELPERS.get_or_init(|| {
        (1..cores())
            .map_while(|i| {
                let helper: &'static Helper = Box::leak(Box::new(Helper {
                    slot: Mutex::new(Slot::default()),
                    working: Default::default(),
                    changed: Condvar::new(),
                }));
                thread::Builder::new()
                    .name(format!("twinsum-read-{i}"))
                    .spawn(move || helper.serve())
                    .inspect_err(|e| warn!("cannot start read helper {i}: {e}"))
                    .ok()
                    .map(|_| helper)
            })
            .collect()
    })
}

/// Waits, even while `a` unwinds, until the helper is done with the job
/// that borrows from the caller's frame.
struct Reclaim<'h> {
    helper: &'h Helper,
    done: bool,
}

impl Reclaim<'_> {
    /// The job back if the helper never took it, else `None` once it ran.
    fn finish(&mut self) -> Option<Job> {
        self.done = true;
        let mut slot = self.helper.lock();
        let job = slot.job.take();
        if job.is_none() && slot.running {
            // The helper is most likely about done (its half is as large
            // as ours): watch for a moment before sleeping, since the
            // pass's last completions wait on this thread waking up.
            drop(slot);
            let start = Instant::now();
            while self.helper.working.load(Ordering::Acquire) && start.elapsed() < HELPER_SPIN {
                std::hint::spin_loop();
            }
            slot = self.helper.lock();
        }
        while slot.running {
            slot = self
                .helper
                .changed
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
        slot.owned = false;
        job
    }
}

impl Drop for Reclaim<'_> {
    fn drop(&mut self) {
        // Left undone only when `a` panicked, with the job still
        // borrowing this frame.
        if !self.done {
            drop(self.finish());
        }
    }
}

/// Run `a` on this thread and `b` on a helper if a core is idle (the
/// caller holds a [`Busy`]) and a helper is free, else both here;
/// return both results. A panic in `b` is raised here.
pub fn join<RA, RB>(a: impl FnOnce() -> RA, b: impl FnOnce() -> RB + Send) -> (RA, RB)
where
    RB: Send,
{
    if ACTIVE.load(Ordering::Relaxed) >= cores() {
        return (a(), b());
    }
    let mut rb: Option<thread::Result<RB>> = None;
    let out = &mut rb;
    let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
        *out = Some(panic::catch_unwind(AssertUnwindSafe(b)));
    });
    let free = helpers().iter().find_map(|helper| {
        let slot = helper.lock();
        (!slot.owned).then_some((*helper, slot))
    });
    let Some((helper, mut slot)) = free else {
        // Every helper is taken by another queue's worker: run both here.
        let ra = a();
        job();
        return (ra, unwrap_half(rb));
    };
    // SAFETY: the job borrows `rb` and what `b` captured, all of which
    // outlive this call; `Reclaim` makes this frame wait, on return and on
    // unwind alike, until the helper has dropped the job or handed it
    // back, so it never runs after they are gone.
    let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
    slot.job = Some(job);
    slot.owned = true;
    helper.changed.notify_all();
    drop(slot);
    let mut reclaim = Reclaim {
        helper,
        done: false,
    };
    let ra = a();
    if let Some(job) = reclaim.finish() {
        // The helper did not get to it: cheaper to run it here than to wait.
        job();
    }
    drop(reclaim);
    (ra, unwrap_half(rb))
}

fn unwrap_half<R>(r: Option<thread::Result<R>>) -> R {
    match r.expect("the second half ran") {
        Ok(r) => r,
        Err(panic) => panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    use super::join;

    #[test]
    fn both_halves_run_and_return_what_they_borrowed() {
        // The first half waits (boundedly) until a helper has begun the
        // second, which is the longer one, well past the worker's watch:
        // so `join` must really wait for a helper at work.
        let data: Vec<u64> = (0..1_000_000).collect();
        let (left, right) = data.split_at(1_000);
        for _ in 0..50 {
            let begun = AtomicBool::new(false);
            let (a, b) = join(
                || {
                    let t = std::time::Instant::now();
                    while !begun.load(Ordering::SeqCst)
                        && t.elapsed() < std::time::Duration::from_millis(100)
                    {
                        std::hint::spin_loop();
                    }
                    left.iter().sum::<u64>()
                },
                || {
                    begun.store(true, Ordering::SeqCst);
                    right.iter().sum::<u64>()
                },
            );
            assert_eq!(a + b, data.iter().sum::<u64>());
            assert_eq!(a, left.iter().sum::<u64>());
        }
    }

    #[test]
    fn a_panic_in_the_second_half_is_raised_by_join() {
        let r = panic::catch_unwind(|| join(|| 1, || -> u32 { panic!("second half failed") }));
        let payload = r.expect_err("join returned past a panic");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"second half failed"));
        // The helper survives it.
        assert_eq!(join(|| 2, || 3), (2, 3));
    }

    #[test]
    fn a_panic_in_the_first_half_waits_for_the_second() {
        for _ in 0..300 {
            let started = AtomicBool::new(false);
            let finished = AtomicBool::new(false);
            let (tx, rx) = mpsc::channel::<()>();
            let (started, finished) = (&started, &finished);
            let r = panic::catch_unwind(AssertUnwindSafe(|| {
                join(
                    || {
                        tx.send(()).expect("the second half listens");
                        panic!("first half failed")
                    },
                    move || {
                        started.store(true, Ordering::SeqCst);
                        // Still running when the first half unwinds.
                        rx.recv().expect("the first half sends");
                        for _ in 0..1000 {
                            std::thread::yield_now();
                        }
                        finished.store(true, Ordering::SeqCst);
                    },
                )
            }));
            assert!(r.is_err());
            // Whatever borrowed this frame is done with it: the second
            // half ran to its end, or never began.
            assert_eq!(
                started.load(Ordering::SeqCst),
                finished.load(Ordering::SeqCst),
                "join unwound while its second half was still running"
            );
        }
    }

    #[test]
    fn workers_of_several_queues_share_the_helpers() {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    for i in 0..2_000u64 {
                        let v = vec![t; 64];
                        let (a, b) = join(|| v[..32].iter().sum::<u64>() + i, || v[32..].to_vec());
                        assert_eq!(a, 32 * t + i);
                        assert_eq!(b, vec![t; 32]);
                    }
                });
            }
        });
    }
}
