//! A request flag a background thread sleeps on: asking twice before it
//! wakes asks once.

use std::sync::{Condvar, Mutex, PoisonError};

#[derive(Debug, Default)]
struct Flags {
    asked: bool,
    stopping: bool,
}

#[derive(Debug, Default)]
pub(super) struct Wakeup {
    m: Mutex<Flags>,
    cv: Condvar,
}

impl Wakeup {
    /// Ask for one more run of the thread's job.
    pub fn ask(&self) {
        let mut f = self.m.lock().unwrap_or_else(PoisonError::into_inner);
        if !f.asked {
            f.asked = true;
            self.cv.notify_one();
        }
    }

    pub fn stop(&self) {
        self.m
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopping = true;
        self.cv.notify_all();
    }

    /// Sleep until asked (true: run the job once) or stopped (false).
    pub fn wait(&self) -> bool {
        let mut f = self.m.lock().unwrap_or_else(PoisonError::into_inner);
        while !f.asked && !f.stopping {
            f = self.cv.wait(f).unwrap_or_else(PoisonError::into_inner);
        }
        f.asked = false;
        !f.stopping
    }
}
