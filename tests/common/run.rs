//! What every test binary that runs `twinsum` needs: where the binary
//! is, path arguments, and polling with a deadline.
//!
//! The helpers of tests/common are modules each test binary declares for
//! itself (`mod common { pub mod run; pub mod disk; ... }`), so that each
//! compiles only what it uses and the dead-code lint still finds helpers
//! nobody uses. Nothing here sleeps for synchronisation: readiness and log
//! lines are polled with a deadline.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// How long anything may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Poll `f` until it returns `Some`, or panic after [`DEADLINE`].
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        // Back-off between polls, not synchronisation: the condition is
        // re-checked every time.
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinsum")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
