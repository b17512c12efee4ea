//! Guest memory that the front-end can pull from under us.
//!
//! Guest memory is the front-end's files (memfds, hugetlbfs or tmpfs
//! files) mapped shared into this process. Touching a page that lies past
//! the end of its file raises SIGBUS, whose default action ends the
//! process. Two defences:
//!
//! - [`check_table`]: a memory table whose regions claim more of a file
//!   than the file holds is refused when it arrives (SET_MEM_TABLE,
//!   ADD_MEM_REG). A memfd sealed with `F_SEAL_SHRINK` can never shrink
//!   later; any other file can.
//! - A SIGBUS handler ([`install`]) for a file that shrinks later. For a
//!   fault inside a registered guest-memory mapping ([`register`]) it maps
//!   anonymous zero memory over the faulting page so the interrupted copy
//!   can finish, marks the region poisoned, and bumps a per-thread fault
//!   counter. Copies to and from guest memory run under [`guarded`], which
//!   turns a fault during the copy into an error, and check [`poisoned`]
//!   around it: once a page has been replaced, what we read there is no
//!   longer the guest's data, and what we write there never reaches it, so
//!   every later request touching that region fails until a new table
//!   replaces it. A fault anywhere else is not ours: the previous action
//!   is restored and the fault re-raised.
//!
//! The handler touches only atomics, a `const`-initialised thread-local
//! `Cell` and the `mmap`/`sigaction`/`raise` system calls: nothing that
//! allocates or locks.

use std::cell::{Cell, UnsafeCell};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, Permissions,
};

/// Regions the handler can know at once. vhost-user allows 509 memory
/// slots; stale ones are dropped as their mappings go.
const SLOTS: usize = 1024;
/// `statfs.f_type` of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// A guest-memory access faulted: the file behind that memory shrank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault;

/// A memory table that cannot be served. The message carries the cause:
/// it reaches the log as the reason the connection ended.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "memory region {gpa:#x}+{len:#x} maps file bytes {offset:#x}..{end:#x}, but the file \
         has only {size:#x} bytes"
    )]
    FileTooShort {
        gpa: u64,
        len: u64,
        offset: u64,
        end: u64,
        size: u64,
    },
    #[error("cannot inspect the file of memory region {gpa:#x}+{len:#x}: {source}")]
    Inspect {
        gpa: u64,
        len: u64,
        source: io::Error,
    },
    #[error("more than {SLOTS} guest memory regions are mapped at once")]
    TooManyRegions,
    #[error("cannot install the SIGBUS handler: {0}")]
    Handler(io::Error),
}

/// One registered mapping, as the signal handler sees it. `len == 0`
/// marks a free slot; `len` is stored last (Release) when a slot is filled
/// and first when it is freed.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    page: AtomicUsize,
    poisoned: AtomicBool,
    /// The poisoning has been logged.
    reported: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            reported: AtomicBool::new(false),
        }
    }

    fn contains(&self, addr: usize) -> Option<(usize, usize)> {
        let len = self.len.load(Ordering::Acquire);
        let start = self.start.load(Ordering::Relaxed);
        (len != 0 && addr >= start && addr - start < len).then_some((start, len))
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// Live slots that are poisoned: the fast path of [`poisoned`] is one load.
static POISONED: AtomicUsize = AtomicUsize::new(0);
/// The mapping behind each slot. Holding it keeps the mapping alive until
/// its slot is cleared, so the handler never sees a slot whose range was
/// unmapped and reused.
static OWNERS: Mutex<Vec<Option<Arc<MmapRegion<()>>>>> = Mutex::new(Vec::new());

thread_local! {
    /// Faults the handler repaired on this thread. `const`-initialised and
    /// without a destructor, so the handler's access is a plain TLS load
    /// and store: no lazy initialisation, no allocation.
    static FAULTS: Cell<u64> = const { Cell::new(0) };
}

/// The SIGBUS action before ours, to hand foreign faults back to.
struct PrevAction(UnsafeCell<MaybeUninit<libc::sigaction>>);

// SAFETY: written once inside `INSTALL` before the handler that reads it is
// installed, and never written again.
unsafe impl Sync for PrevAction {}

static PREV: PrevAction = PrevAction(UnsafeCell::new(MaybeUninit::zeroed()));
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Install the SIGBUS handler (once per process; later calls report
/// whether the first succeeded).
pub fn install() -> Result<(), TableError> {
    let mut error = None;
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid empty action,
        // completed below before use.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise. PREV is
        // written here, before our handler (its only reader) is installed,
        // and `Once` makes this the only writer.
        let rc = unsafe {
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGBUS, &act, (*PREV.0.get()).as_mut_ptr())
        };
        if rc == 0 {
            INSTALLED.store(true, Ordering::Release);
        } else {
            error = Some(io::Error::last_os_error());
        }
    });
    match error {
        Some(e) => Err(TableError::Handler(e)),
        None if INSTALLED.load(Ordering::Acquire) => Ok(()),
        None => Err(TableError::Handler(io::Error::other(
            "an earlier attempt failed",
        ))),
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: installed with SA_SIGINFO, so the kernel passes a valid
    // siginfo_t for the signal being handled.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code > 0: raised by the kernel for a fault at `addr` (a kill()
    // or tgkill() has code <= 0 and no meaningful address).
    if code > 0 && replace_page(addr) {
        FAULTS.with(|f| f.set(f.get().wrapping_add(1)));
        return;
    }
    // SAFETY: PREV was filled before this handler was installed and is
    // read-only since. Restoring it and re-raising gives the signal to
    // whoever had it before (std's stack-overflow reporter, or the default
    // action): a fault re-executes on return and meets that action; a sent
    // signal is sent again.
    unsafe {
        libc::sigaction(sig, (*PREV.0.get()).as_ptr(), std::ptr::null_mut());
        if code <= 0 {
            libc::raise(sig);
        }
    }
}

/// In the handler: if `addr` is in a registered mapping, map zero memory
/// over its page. Only atomics and one mmap system call.
fn replace_page(addr: usize) -> bool {
    for slot in &TABLE {
        let Some((start, len)) = slot.contains(addr) else {
            continue;
        };
        let page = slot.page.load(Ordering::Relaxed).max(1);
        // Mappings start page-aligned (hugetlbfs ones huge-page-aligned).
        let base = start + (addr - start) / page * page;
        let size = page.min(start + len - base);
        // Poison before the page changes: a thread that then reads the
        // zero page without faulting finds the flag when it checks after
        // its copy.
        if !slot.poisoned.swap(true, Ordering::SeqCst) {
            POISONED.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: [base, base + size) lies inside a live mapping of guest
        // memory that we own (its slot is set, so `OWNERS` holds it).
        // Replacing those pages with private anonymous ones only changes
        // what later accesses of guest memory read; nothing of ours lives
        // there. mmap is a plain system call: it takes no user-space lock.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        return p != libc::MAP_FAILED;
    }
    false
}

/// Run `f`, a copy to or from guest memory on this thread; `Err(Fault)`
/// if it touched a page whose file had shrunk (the handler let it finish
/// on zeros).
pub fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, Fault> {
    match watched(f) {
        (r, false) => Ok(r),
        (_, true) => Err(Fault),
    }
}

/// [`guarded`] for work that must keep its result either way: `f`'s
/// result, and whether guest memory faulted on this thread while it ran.
pub fn watched<T>(f: impl FnOnce() -> T) -> (T, bool) {
    let before = FAULTS.with(Cell::get);
    // The handler runs on this thread between these fences: keep the
    // compiler from moving the counter reads across the copy.
    compiler_fence(Ordering::SeqCst);
    let r = f();
    compiler_fence(Ordering::SeqCst);
    (r, FAULTS.with(Cell::get) != before)
}

/// Does `addr..addr + len` of `mem` touch a region that has faulted?
pub fn poisoned<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, len: usize) -> bool {
    // Pairs with the handler's SeqCst poisoning, for a copy that read a
    // replaced page without faulting itself.
    fence(Ordering::SeqCst);
    if POISONED.load(Ordering::SeqCst) == 0 || len == 0 {
        return false;
    }
    let Ok(slices) = mem.get_slices(addr, len, Permissions::Read) else {
        return false;
    };
    slices.flatten().any(|s| {
        let host = s.ptr_guard().as_ptr() as usize;
        TABLE.iter().any(|slot| {
            slot.poisoned.load(Ordering::SeqCst)
                && (slot.contains(host).is_some()
                    || slot.contains(host + s.len().saturating_sub(1)).is_some())
        })
    })
}

/// Regions of `mem` that faulted since last asked: (guest address, size),
/// each reported once.
pub fn newly_poisoned(mem: &GuestMemoryMmap) -> Vec<(GuestAddress, u64)> {
    if POISONED.load(Ordering::SeqCst) == 0 {
        return Vec::new();
    }
    mem.iter()
        .filter(|r| {
            let host = r.as_ptr() as usize;
            TABLE.iter().any(|slot| {
                slot.contains(host).is_some_and(|(start, _)| start == host)
                    && slot.poisoned.load(Ordering::SeqCst)
                    && !slot.reported.swap(true, Ordering::SeqCst)
            })
        })
        .map(|r| (r.start_addr(), r.len()))
        .collect()
}

/// Make every region of `mem` known to the SIGBUS handler, and forget the
/// mappings nothing else uses any more.
pub fn register(mem: &GuestMemoryMmap) -> Result<(), TableError> {
    install()?;
    let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
    if owners.is_empty() {
        owners.resize(SLOTS, None);
    }
    prune(&mut owners);
    for region in mem.iter() {
        let mmap = region.get_mmap();
        if owners.iter().flatten().any(|o| Arc::ptr_eq(o, &mmap)) {
            continue;
        }
        let i = owners
            .iter()
            .position(Option::is_none)
            .ok_or(TableError::TooManyRegions)?;
        let slot = &TABLE[i];
        slot.poisoned.store(false, Ordering::SeqCst);
        slot.reported.store(false, Ordering::SeqCst);
        slot.start.store(mmap.as_ptr() as usize, Ordering::Relaxed);
        slot.page.store(
            page_size(region.file_offset().map(|f| f.file())),
            Ordering::Relaxed,
        );
        slot.len.store(mmap.size(), Ordering::Release);
        owners[i] = Some(mmap);
    }
    Ok(())
}

/// Forget (and so unmap) the registered mappings nothing else uses.
pub fn forget_unused() {
    let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
    prune(&mut owners);
}

/// Drop the slots whose mapping only we still hold: no thread can be
/// touching it (touching needs a reference), so its slot can go before
/// the mapping does.
fn prune(owners: &mut [Option<Arc<MmapRegion<()>>>]) {
    for (i, o) in owners.iter_mut().enumerate() {
        if o.as_ref().is_some_and(|m| Arc::strong_count(m) == 1) {
            let slot = &TABLE[i];
            slot.len.store(0, Ordering::Release);
            if slot.poisoned.swap(false, Ordering::SeqCst) {
                POISONED.fetch_sub(1, Ordering::SeqCst);
            }
            *o = None;
        }
    }
}

/// The page size of a mapping of `file`: a hugetlbfs file's huge page,
/// else the base page.
fn page_size(file: Option<&File>) -> usize {
    // SAFETY: sysconf has no memory effects.
    let base = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let Some(file) = file else { return base };
    // SAFETY: statfs is plain data, filled by fstatfs before it is read.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a live descriptor and a live statfs to fill.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0
        && st.f_type as i64 == HUGETLBFS_MAGIC
    {
        return usize::try_from(st.f_bsize).unwrap_or(base).max(base);
    }
    base
}

/// Refuse a table whose regions new to it (not in `known`) claim more of
/// their files than the files hold.
pub fn check_table(mem: &GuestMemoryMmap, known: &GuestMemoryMmap) -> Result<(), TableError> {
    for region in mem.iter() {
        let mmap = region.get_mmap();
        if known.iter().any(|k| Arc::ptr_eq(&k.get_mmap(), &mmap)) {
            continue;
        }
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let (gpa, len) = (region.start_addr().0, region.len());
        let inspect = |source| TableError::Inspect { gpa, len, source };
        let Some(size) = file_size(fo.file()).map_err(inspect)? else {
            continue;
        };
        let offset = fo.start();
        let end = offset.saturating_add(len);
        if size < end {
            return Err(TableError::FileTooShort {
                gpa,
                len,
                offset,
                end,
                size,
            });
        }
        match seals(fo.file()) {
            Some(s) if s & libc::F_SEAL_SHRINK == 0 => log::debug!(
                "memory region {gpa:#x}+{len:#x}: its memfd is not sealed against shrinking; \
                 should it shrink, requests touching it fail"
            ),
            _ => {}
        }
    }
    Ok(())
}

/// The size of a regular file or block device; `None` for anything whose
/// size means nothing for a mapping (a character device).
fn file_size(file: &File) -> io::Result<Option<u64>> {
    let meta = file.metadata()?;
    let ty = meta.file_type();
    if ty.is_file() {
        return Ok(Some(meta.len()));
    }
    if ty.is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t).
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the ioctl writes one u64 into `size`, which is live.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(Some(size));
    }
    Ok(None)
}

/// The seals of a memfd; `None` for a file that takes none.
fn seals(file: &File) -> Option<i32> {
    // SAFETY: F_GET_SEALS only reads the file's seals.
    let s = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    (s >= 0).then_some(s)
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::fd::FromRawFd;
    use std::process::Command;

    use vm_memory::{Bytes, FileOffset};

    use super::*;

    const PAGE: usize = 4096;

    fn memfd(len: u64) -> File {
        let name = CString::new("guestmem-test").unwrap();
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    /// Guest memory of `pages` pages at guest address 0 over `file`.
    fn guest(file: &File, pages: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            pages * PAGE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap()
    }

    #[test]
    fn a_table_larger_than_its_file_is_refused_and_a_known_region_is_not_rechecked() {
        let f = memfd(PAGE as u64);
        let m = guest(&f, 2);
        let e = check_table(&m, &GuestMemoryMmap::new()).unwrap_err();
        assert!(
            matches!(
                e,
                TableError::FileTooShort {
                    size: 4096,
                    end: 8192,
                    ..
                }
            ),
            "{e}"
        );
        f.set_len(2 * PAGE as u64).unwrap();
        check_table(&m, &GuestMemoryMmap::new()).unwrap();
        f.set_len(PAGE as u64).unwrap();
        check_table(&m, &m).expect("only new regions are checked");
        // Anonymous memory has no file to check.
        let anon = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGE)]).unwrap();
        check_table(&anon, &GuestMemoryMmap::new()).unwrap();
    }

    #[test]
    fn a_fault_in_registered_memory_fails_the_copy_and_poisons_the_region() {
        let f = memfd(3 * PAGE as u64);
        let m = guest(&f, 3);
        register(&m).unwrap();
        m.write_slice(&[7u8; 16], GuestAddress(0)).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(
            guarded(|| m.read_slice(&mut buf, GuestAddress(PAGE as u64 * 2))),
            Ok(Ok(()))
        ));
        assert!(!poisoned(&m, GuestAddress(0), 16));
        f.set_len(PAGE as u64).unwrap();
        buf = [1u8; 16];
        assert!(
            matches!(
                guarded(|| m.read_slice(&mut buf, GuestAddress(PAGE as u64 * 2 + 8))),
                Err(Fault)
            ),
            "the copy past the new end of the file faulted"
        );
        assert_eq!(buf, [0u8; 16], "and finished on zeros");
        // Writing there now neither faults nor reaches the file: poisoned.
        assert!(matches!(
            guarded(|| m.write_slice(&[9u8; 16], GuestAddress(PAGE as u64 * 2))),
            Ok(Ok(()))
        ));
        assert!(poisoned(&m, GuestAddress(0), 1), "the whole region");
        assert_eq!(newly_poisoned(&m), vec![(GuestAddress(0), 3 * PAGE as u64)]);
        assert!(newly_poisoned(&m).is_empty(), "reported once");
        // Still in the file: the data is there.
        m.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(buf, [7u8; 16]);
        // Once no one maps it, the slot goes and its poison with it.
        drop(m);
        let other = guest(&memfd(PAGE as u64), 1);
        register(&other).unwrap();
        assert!(!poisoned(&other, GuestAddress(0), 1));
    }

    /// Run by `a_fault_outside_guest_memory_still_kills`, in a child.
    #[test]
    #[ignore = "runs in a child process: it dies of SIGBUS on purpose"]
    fn sigbus_outside_guest_memory_child() {
        install().unwrap();
        let f = memfd(2 * PAGE as u64);
        // Mapped by us, not registered as guest memory.
        let m = guest(&f, 2);
        f.set_len(0).unwrap();
        let mut buf = [0u8; 4];
        let _ = m.read_slice(&mut buf, GuestAddress(PAGE as u64));
        unreachable!("the read past the end of the file must have killed us");
    }

    #[test]
    fn a_fault_outside_guest_memory_still_kills() {
        use std::os::unix::process::ExitStatusExt;
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "blk::guestmem::tests::sigbus_outside_guest_memory_child",
                "--ignored",
                "--nocapture",
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
