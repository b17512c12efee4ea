//! The blocks found mismatched most recently, for status reports.
//!
//! Kept apart from the counters: a bounded list behind its own small lock,
//! touched only when a read finds a mismatch, never on the I/O fast path.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// How many distinct blocks the list keeps.
pub const RECENT_MISMATCHES: usize = 64;

#[derive(Debug, Default)]
pub(super) struct Recent {
    /// Most recent last; each block at most once.
    blocks: Mutex<VecDeque<u64>>,
}

impl Recent {
    /// Remember `bad`. A block found again moves to the front rather than
    /// taking a second place, so one block read in a loop cannot push the
    /// others out.
    pub fn note(&self, bad: &[u64]) {
        let mut q = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        for &b in bad {
            if let Some(i) = q.iter().position(|&x| x == b) {
                q.remove(i);
            } else if q.len() == RECENT_MISMATCHES {
                q.pop_front();
            }
            q.push_back(b);
        }
    }

    /// Most recent first.
    pub fn list(&self) -> Vec<u64> {
        let q = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        q.iter().rev().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_bounded_most_recent_first_and_without_repeats() {
        let r = Recent::default();
        r.note(&[1, 2, 3]);
        r.note(&[1]);
        assert_eq!(r.list(), vec![1, 3, 2]);
        let many: Vec<u64> = (100..100 + RECENT_MISMATCHES as u64 + 10).collect();
        r.note(&many);
        let l = r.list();
        assert_eq!(l.len(), RECENT_MISMATCHES);
        assert_eq!(l[0], *many.last().unwrap());
        assert!(!l.contains(&1), "the oldest fell out");
    }
}
