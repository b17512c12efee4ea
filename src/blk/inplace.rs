//! Reads verified in the guest's own buffer.
//!
//! DESIGN §2 reads into a buffer we own, verifies it, then copies it to
//! the guest: three passes over the data (device to buffer, hash, buffer
//! to guest). Reading straight into the guest's buffer and verifying it
//! there saves the last one. That is sound only with a fallback, because
//! the guest may write into its own read buffer while the request runs:
//!
//! - the engine's [`Op::TryRead`](crate::integrity::Op::TryRead) verifies
//!   the bytes in place and reports a mismatch without logging, counting
//!   or remembering it;
//! - a read that fails that way (or faults, or meets a poisoned region) is
//!   wiped, so no unverified byte stays in the guest's buffer, and run
//!   again the DESIGN §2 way, which alone decides whether the block is bad.
//!
//! So a guest that scribbles on its own buffer costs itself a second read,
//! never a false mismatch; and what the guest finds after a good status
//! matched a checksum when it was hashed, as it would have after a copy.
//!
//! Only buffers that split into whole blocks take this path (the engine
//! verifies block by block, one device read per piece), and only large
//! pieces when there are several: one device read per 4 KiB page of a
//! scattered buffer costs more than the copy it saves.

use std::collections::BTreeMap;

use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::guestmem;
use super::request::Segment;

/// With several guest buffers, each must be at least this long.
const MIN_PIECE: usize = 32 << 10;

/// One host-contiguous piece of a guest read buffer.
#[derive(Debug)]
pub struct Piece {
    ptr: *mut u8,
    len: usize,
}

/// Host memory that in-place reads of one batch read into: no two of
/// them may share a byte. A guest that gives two reads (or two segments
/// of one) the same buffer gets what it asked for the DESIGN §2 way; in
/// place, one read failing would wipe what the other verified.
#[derive(Debug, Default)]
pub struct Claims {
    /// Start → end of each claimed piece.
    ranges: BTreeMap<usize, usize>,
}

impl Claims {
    /// Claim all of `pieces`, or none if one overlaps a claim (or another).
    fn claim(&mut self, pieces: &[Piece]) -> bool {
        let mut taken: Vec<(usize, usize)> = Vec::with_capacity(pieces.len());
        for p in pieces {
            let (start, end) = (p.ptr as usize, p.ptr as usize + p.len);
            let before = self.ranges.range(..end).next_back();
            if before.is_some_and(|(_, &e)| e > start)
                || taken.iter().any(|&(s, e)| s < end && start < e)
            {
                return false;
            }
            taken.push((start, end));
        }
        self.ranges.extend(taken);
        true
    }
}

/// Whether any byte of guest memory lies in a read buffer of both `a` and
/// `b` (by host address, as [`Claims`] compares), or cannot be told. The
/// halves of a pass that two threads read in place must not share one:
/// each thread's [`Claims`] sees only its own half.
pub fn share_memory<M: GuestMemory + ?Sized>(mem: &M, a: &[&[Segment]], b: &[&[Segment]]) -> bool {
    let ranges = |reads: &[&[Segment]]| -> Option<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        for s in reads.iter().flat_map(|segs| segs.iter()) {
            for p in host_pieces(mem, s.addr, s.len as usize)? {
                out.push((p.ptr as usize, p.ptr as usize + p.len));
            }
        }
        out.sort_unstable();
        Some(out)
    };
    let (Some(a), Some(b)) = (ranges(a), ranges(b)) else {
        return true;
    };
    // Both sorted: walk them together.
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].0 < b[j].1 && b[j].0 < a[i].1 {
            return true;
        }
        if a[i].1 <= b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    false
}

/// The host memory behind `len` bytes of guest memory at `addr`, one
/// piece per region it crosses; `None` if any of it is outside the table
/// or not writable.
fn host_pieces<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<Vec<Piece>> {
    mem.get_slices(addr, len, Permissions::Write)
        .ok()?
        .map(|slice| {
            let slice = slice.ok()?;
            Some(Piece {
                ptr: slice.ptr_guard_mut().as_ptr(),
                len: slice.len(),
            })
        })
        .collect()
}

/// The guest buffers `data` of a read of `len` bytes as host pieces of
/// whole `block_size` blocks, claimed in `claims`, or `None` when the read
/// should go through a buffer of ours (pieces too small or not whole
/// blocks, memory outside the table or already faulted, or shared with
/// another read of the batch).
pub fn pieces<M: GuestMemory + ?Sized>(
    mem: &M,
    data: &[Segment],
    len: usize,
    block_size: usize,
    claims: &mut Claims,
) -> Option<Vec<Piece>> {
    let mut pieces = Vec::with_capacity(data.len());
    let mut left = len;
    for s in data {
        if left == 0 {
            break;
        }
        let n = left.min(s.len as usize);
        if guestmem::poisoned(mem, s.addr, n) {
            return None;
        }
        let host = host_pieces(mem, s.addr, n)?;
        if host.iter().any(|p| p.len % block_size != 0) {
            return None;
        }
        pieces.extend(host);
        left -= n;
    }
    let small = pieces.len() > 1 && pieces.iter().any(|p| p.len < MIN_PIECE);
    (left == 0 && !small && claims.claim(&pieces)).then_some(pieces)
}

impl Piece {
    /// The piece as a byte slice for the engine to read into and verify.
    ///
    /// # Safety
    /// The mapping must outlive the slice (the caller holds the memory
    /// snapshot the piece came from), and the slice must be the only one
    /// of ours over these bytes while it lives ([`Claims`] keeps the
    /// pieces of one batch apart). The guest may still write them at any
    /// time: whatever is hashed there is checked again the DESIGN §2 way
    /// before a mismatch is believed (see the module docs).
    pub unsafe fn as_mut_slice<'a>(&self) -> &'a mut [u8] {
        // SAFETY: the caller's contract above; `ptr..ptr + len` came from
        // one guest memory region's mapping, checked writable.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Leave zeros where a failed read may have left unverified bytes.
    ///
    /// # Safety
    /// The mapping must still be there, as for
    /// [`as_mut_slice`](Self::as_mut_slice), and no slice of it alive.
    pub unsafe fn wipe(&self) {
        // A fault while wiping leaves the handler's zero page: zeros too.
        let _ = guestmem::guarded(|| {
            for i in 0..self.len {
                // SAFETY: `i < len` of a mapping the caller keeps; volatile
                // so that stores into memory the guest shares are kept.
                unsafe { self.ptr.add(i).write_volatile(0) };
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn lens(p: Option<Vec<Piece>>) -> Option<Vec<usize>> {
        p.map(|v| v.iter().map(|p| p.len).collect())
    }

    #[test]
    fn halves_share_memory_where_their_buffers_overlap() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 20), 1 << 20),
        ])
        .unwrap();
        let share = |a: &[Segment], b: &[Segment]| share_memory(&mem, &[a], &[b]);
        assert!(!share(&[seg(0, 65536)], &[seg(65536, 65536)]), "adjacent");
        assert!(share(&[seg(0, 65536)], &[seg(61440, 8192)]), "overlapping");
        // Several buffers a side, the overlap between the last ones, one
        // of them across the two regions.
        assert!(share(
            &[seg(1 << 20, 4096), seg((1 << 20) - 4096, 8192)],
            &[seg(8192, 4096), seg(1 << 20, 4096)]
        ));
        assert!(!share(
            &[seg(1 << 20, 4096), seg(0, 4096)],
            &[seg((1 << 20) + 4096, 4096), seg(4096, 4096)]
        ));
        // Memory outside the table: cannot tell, so treated as shared.
        assert!(share(&[seg(0, 4096)], &[seg(8 << 20, 4096)]));
    }

    #[test]
    fn whole_blocks_go_in_place_and_scattered_pages_do_not() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 20), 1 << 20),
        ])
        .unwrap();
        let pieces =
            |segs: &[Segment], len| lens(pieces(&mem, segs, len, 4096, &mut Claims::default()));
        assert_eq!(pieces(&[seg(0, 4096)], 4096), Some(vec![4096]));
        assert_eq!(
            pieces(&[seg(0, 64 << 10), seg(1 << 19, 64 << 10)], 128 << 10),
            Some(vec![64 << 10, 64 << 10])
        );
        // One buffer across the two regions: two host pieces.
        assert_eq!(
            pieces(&[seg((1 << 20) - (64 << 10), 128 << 10)], 128 << 10),
            Some(vec![64 << 10, 64 << 10])
        );
        assert_eq!(pieces(&[seg(0, 4096), seg(8192, 4096)], 8192), None);
        assert_eq!(pieces(&[seg(0, 1000), seg(4096, 3096)], 4096), None);
        assert_eq!(pieces(&[seg(2 << 20, 4096)], 4096), None, "outside memory");
        assert_eq!(
            pieces(&[seg(0, 64 << 10), seg(32 << 10, 64 << 10)], 128 << 10),
            None,
            "segments sharing bytes"
        );
    }

    #[test]
    fn reads_of_one_batch_sharing_bytes_do_not_both_go_in_place() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut claims = Claims::default();
        let mut take = |addr, len| pieces(&mem, &[seg(addr, len)], len as usize, 4096, &mut claims);
        assert!(take(0x1_0000, 8192).is_some());
        assert!(take(0x1_2000, 4096).is_some(), "adjacent is fine");
        assert!(take(0x1_1000, 4096).is_none(), "inside the first");
        assert!(take(0x0_f000, 8192).is_none(), "over the first's start");
        assert!(take(0x0_f000, 4096).is_some(), "just before it");
    }
}
