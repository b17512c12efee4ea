//! A log rate limiter: a guest can send millions of bad requests a second,
//! and each must not cost a log line.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `burst` events per `period`, then counts what it drops.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    period: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Instant,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    pub fn new(burst: u32, period: Duration) -> Self {
        Self {
            burst,
            period,
            state: Mutex::new(State {
                start: Instant::now(),
                used: 0,
                dropped: 0,
            }),
        }
    }

    /// `Some(n)` if this event may be logged, `n` being how many were
    /// suppressed since the last one that was; `None` to stay quiet.
    pub fn check(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(s.start) >= self.period {
            s.start = now;
            s.used = 0;
        }
        if s.used >= self.burst {
            s.dropped += 1;
            return None;
        }
        s.used += 1;
        Some(std::mem::take(&mut s.dropped))
    }

    /// Log `args` at `level` unless over the limit, mentioning what was
    /// suppressed in between.
    pub fn log(&self, level: log::Level, args: std::fmt::Arguments<'_>) {
        if !log::log_enabled!(level) {
            return;
        }
        if let Some(dropped) = self.check() {
            if dropped > 0 {
                log::log!(level, "({dropped} similar messages suppressed)");
            }
            log::log!(level, "{args}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_counts_drops() {
        let r = RateLimit::new(2, Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        let r2 = RateLimit::new(1, Duration::ZERO);
        assert_eq!(r2.check(), Some(0));
        assert_eq!(r2.check(), Some(0));
    }
}
