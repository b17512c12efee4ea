//! Group commit for device syncs.
//!
//! Many threads need "a sync that began after my writes were issued". One
//! of them runs it; every thread that arrived while an earlier sync was
//! running shares the next one. So N concurrent committers cost at most two
//! syncs, not N.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct GateState {
    /// Number of syncs begun so far (the running one included).
    begun: u64,
    /// Number of the last sync that completed.
    done: u64,
    running: bool,
    /// Result of the sync numbered `done`.
    last_error: Option<(io::ErrorKind, String)>,
}

/// A group-commit point for one device.
#[derive(Debug, Default)]
pub(crate) struct SyncGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

/// Proof of when a caller's prerequisites were met: any sync numbered at or
/// above it began afterwards.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket(u64);

impl SyncGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take a ticket now: every write issued before this call will be
    /// covered by a sync that satisfies it.
    pub(crate) fn ticket(&self) -> Ticket {
        Ticket(self.lock().begun + 1)
    }

    /// Wait until a sync that began after `ticket` was taken has completed,
    /// running `sync` ourselves when nobody else is.
    pub(crate) fn sync_after(
        &self,
        ticket: Ticket,
        sync: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut st = self.lock();
        loop {
            if st.done >= ticket.0 {
                // The latest completed sync began after the ticket.
                return match &st.last_error {
                    None => Ok(()),
                    Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
                };
            }
            if !st.running {
                break;
            }
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.begun += 1;
        st.running = true;
        let number = st.begun;
        drop(st);

        let result = sync();

        let mut st = self.lock();
        st.running = false;
        st.done = number;
        st.last_error = result.as_ref().err().map(|e| (e.kind(), e.to_string()));
        drop(st);
        self.changed.notify_all();
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_satisfied_ticket_does_not_sync_again() {
        let gate = SyncGate::default();
        let count = AtomicU64::new(0);
        let t = gate.ticket();
        gate.sync_after(t, || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        gate.sync_after(t, || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // A fresh ticket needs a fresh sync.
        gate.sync_after(gate.ticket(), || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_sync_fails_its_waiters() {
        let gate = SyncGate::default();
        let t = gate.ticket();
        let err = gate
            .sync_after(t, || Err(io::Error::other("disk gone")))
            .unwrap_err();
        assert!(err.to_string().contains("disk gone"));
        assert!(gate.sync_after(t, || Ok(())).is_err());
        assert!(gate.sync_after(gate.ticket(), || Ok(())).is_ok());
    }

    #[test]
    fn every_committer_is_covered_by_a_sync_begun_after_its_ticket() {
        let gate = Arc::new(SyncGate::default());
        let begun = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gate, begun) = (gate.clone(), begun.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let before = begun.load(Ordering::SeqCst);
                        let t = gate.ticket();
                        gate.sync_after(t, || {
                            begun.fetch_add(1, Ordering::SeqCst);
                            std::thread::yield_now();
                            Ok(())
                        })
                        .unwrap();
                        assert!(begun.load(Ordering::SeqCst) > before);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
