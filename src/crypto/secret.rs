//! Keeping keys out of core dumps and swap.
//!
//! - The process is made non-dumpable (`PR_SET_DUMPABLE 0`) before any key is read: no core file,
//!   and no other process of the user can read its memory through /proc or ptrace.
//! - Everything allocated while deriving keys and building ciphers (inside [`scope`]) comes from one
//!   arena that is locked in memory (`mlock`: never swapped) and excluded from dumps
//!   (`MADV_DONTDUMP`: not in a core, nor in what `gcore` writes), and is zeroed when freed: the
//!   passphrase's copies, PBKDF2 output, key material, the master key and the expanded AES round
//!   keys that live as long as the mount. The binary installs [`SecretAwareAlloc`] as its global
//!   allocator; without it (library tests) a scope is plain heap memory.
//! - [`scrub_stack`] overwrites the stack below the caller, where key derivation left copies, and
//!   every thread that encrypts or decrypts marks its own stack `MADV_DONTDUMP` (the AES code spills
//!   round keys there): see [`StackHiding`].
//!
//! The arena is small and fixed (a hostile LUKS header cannot make it grow): an allocation that
//! does not fit comes from the normal heap, like everything outside a scope.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// Bytes of the locked, undumpable arena.
const ARENA_BYTES: usize = 4 << 20;
/// Allocation unit: every allocation is a run of whole units.
const UNIT: usize = 64;
const UNITS: usize = ARENA_BYTES / UNIT;
/// The largest alignment the arena serves (the arena itself is page aligned).
const MAX_ALIGN: usize = 4096;

thread_local! {
    static IN_SCOPE: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with every heap allocation of this thread coming from the secret arena.
pub fn scope<T>(f: impl FnOnce() -> T) -> T {
    let outer = IN_SCOPE.with(|s| s.replace(true));
    let out = f();
    IN_SCOPE.with(|s| s.set(outer));
    // Threads started from here on copy this thread's registers: leave no key in them.
    clear_vector_registers();
    out
}

/// Make this process non-dumpable: no core dump, no /proc/PID/mem or ptrace by the same user.
pub fn protect_process() {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        log::debug!(
            "cannot make the process non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Overwrite `BYTES` of stack below the caller's frame, where the frames of key derivation were.
#[inline(never)]
pub fn scrub_stack() {
    const BYTES: usize = 256 << 10;
    let mut area = [0u8; BYTES];
    // Volatile: the writes must happen although nothing reads them.
    for b in area.iter_mut() {
        // SAFETY: a valid, aligned pointer into a local array.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::hint::black_box(&area);
    clear_vector_registers();
}

thread_local! {
    static STACK_HIDDEN: Cell<bool> = const { Cell::new(false) };
}

/// Exclude this thread's stack from core dumps, once per thread. Ciphers spill round keys onto
/// the stack of whichever thread encrypts or decrypts, so every such thread calls this first.
pub fn hide_this_thread_stack() {
    if STACK_HIDDEN.with(|h| h.replace(true)) {
        return;
    }
    // SAFETY: pthread_getattr_np fills `attr` for the calling thread; it is destroyed below; the
    // range it names is this thread's stack (for the main thread: as far as it may grow, of which
    // madvise marks the mapped part and reports the rest as ENOMEM, ignored).
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        if libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0 && !addr.is_null() {
            let page = 4096usize;
            let start = (addr as usize).div_ceil(page) * page;
            let end = (addr as usize + size) / page * page;
            if end > start {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP);
            }
        }
        libc::pthread_attr_destroy(&mut attr);
    }
}

/// Zero the vector registers, where AES-NI code leaves round keys when it returns (a core dump or
/// `gcore` saves every thread's registers in its notes, which no madvise can exclude).
#[inline(always)]
pub fn clear_vector_registers() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // memcpy copies through whole ymm registers: zero all 256 bits of each.
        // SAFETY: only zeroes registers declared clobbered; no memory, stack or flags are touched.
        unsafe {
            std::arch::asm!(
                "vzeroall",
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                options(nomem, nostack, preserves_flags),
            );
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only zeroes registers declared clobbered; no memory, stack or flags are touched.
    unsafe {
        std::arch::asm!(
            "xorps xmm0, xmm0", "xorps xmm1, xmm1", "xorps xmm2, xmm2", "xorps xmm3, xmm3",
            "xorps xmm4, xmm4", "xorps xmm5, xmm5", "xorps xmm6, xmm6", "xorps xmm7, xmm7",
            "xorps xmm8, xmm8", "xorps xmm9, xmm9", "xorps xmm10, xmm10", "xorps xmm11, xmm11",
            "xorps xmm12, xmm12", "xorps xmm13, xmm13", "xorps xmm14, xmm14", "xorps xmm15, xmm15",
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nomem, nostack, preserves_flags),
        );
    }
}

/// A sector cipher whose users' stacks are kept out of core dumps (see `hide_this_thread_stack`)
/// and whose round keys do not stay behind in vector registers.
#[derive(Debug)]
pub struct StackHiding(pub Box<dyn crate::crypto::SectorCipher>);

impl crate::crypto::SectorCipher for StackHiding {
    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), crate::crypto::CryptoError> {
        hide_this_thread_stack();
        let out = self.0.decrypt(first_sector, buf);
        clear_vector_registers();
        out
    }

    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), crate::crypto::CryptoError> {
        hide_this_thread_stack();
        let out = self.0.encrypt(first_sector, buf);
        clear_vector_registers();
        out
    }
}

/// The arena: a fixed mapping and a bitmap of used units under a spin lock (the allocator may not
/// itself allocate, so no std mutex).
struct Arena {
    base: AtomicPtr<u8>,
    ready: AtomicBool,
    lock: AtomicBool,
    used: std::cell::UnsafeCell<[u64; UNITS / 64]>,
}

// SAFETY: `used` is only touched with `lock` held; `base` is set once.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena {
    base: AtomicPtr::new(std::ptr::null_mut()),
    ready: AtomicBool::new(false),
    lock: AtomicBool::new(false),
    used: std::cell::UnsafeCell::new([0; UNITS / 64]),
};

impl Arena {
    fn with_lock<T>(&self, f: impl FnOnce(&mut [u64; UNITS / 64]) -> T) -> T {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held: nobody else touches `used`.
        let out = f(unsafe { &mut *self.used.get() });
        self.lock.store(false, Ordering::Release);
        out
    }

    /// Map, lock and mark the arena on first use (under the lock). Null if it cannot be mapped.
    fn base(&self) -> *mut u8 {
        if self.ready.load(Ordering::Acquire) {
            return self.base.load(Ordering::Relaxed);
        }
        // SAFETY: an anonymous private mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let p = if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            // SAFETY: the mapping just made. Both are best effort: mlock may exceed
            // RLIMIT_MEMLOCK for a normal user, and then the memory may be swapped, not dumped.
            unsafe {
                libc::madvise(p, ARENA_BYTES, libc::MADV_DONTDUMP);
                libc::mlock(p, ARENA_BYTES);
            }
            p.cast::<u8>()
        };
        self.base.store(p, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
        p
    }

    fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > MAX_ALIGN || layout.size() == 0 || layout.size() > ARENA_BYTES / 2 {
            return std::ptr::null_mut();
        }
        let units = layout.size().div_ceil(UNIT);
        let step = (layout.align() / UNIT).max(1);
        self.with_lock(|used| {
            let base = self.base();
            if base.is_null() {
                return std::ptr::null_mut();
            }
            let is_free = |u: usize| used[u / 64] & (1 << (u % 64)) == 0;
            let mut start = 0;
            while start + units <= UNITS {
                match (start..start + units).find(|&u| !is_free(u)) {
                    None => {
                        for u in start..start + units {
                            used[u / 64] |= 1 << (u % 64);
                        }
                        // SAFETY: inside the arena mapping.
                        return unsafe { base.add(start * UNIT) };
                    }
                    Some(taken) => start = (taken + 1).div_ceil(step) * step,
                }
            }
            std::ptr::null_mut()
        })
    }

    fn contains(&self, p: *mut u8) -> bool {
        let base = self.base.load(Ordering::Relaxed);
        !base.is_null() && p >= base && (p as usize) < base as usize + ARENA_BYTES
    }

    /// Zero and release an allocation of the arena.
    fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: `p` is an arena allocation of `layout.size()` bytes being freed.
        unsafe {
            for i in 0..layout.size() {
                std::ptr::write_volatile(p.add(i), 0);
            }
        }
        let first = (p as usize - self.base.load(Ordering::Relaxed) as usize) / UNIT;
        let units = layout.size().div_ceil(UNIT);
        self.with_lock(|used| {
            for u in first..first + units {
                used[u / 64] &= !(1 << (u % 64));
            }
        });
    }
}

/// The global allocator of the binary: the system allocator, except inside a [`scope`].
pub struct SecretAwareAlloc;

// SAFETY: every allocation comes from either the system allocator or the arena, and is returned to
// the one it came from (told by its address).
unsafe impl GlobalAlloc for SecretAwareAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if IN_SCOPE.try_with(Cell::get).unwrap_or(false) {
            let p = ARENA.alloc(layout);
            if !p.is_null() {
                return p;
            }
        }
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if IN_SCOPE.try_with(Cell::get).unwrap_or(false) {
            let p = ARENA.alloc(layout);
            if !p.is_null() {
                // SAFETY: a fresh arena block of layout.size() bytes.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
        }
        // SAFETY: forwarded as received. calloc, not malloc + memset: a large zeroed buffer then
        // costs no memory until it is written (the 4 GiB burst test's RSS depends on it).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARENA.contains(ptr) {
            ARENA.dealloc(ptr, layout);
        } else {
            // SAFETY: it came from the system allocator.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !ARENA.contains(ptr) && !IN_SCOPE.try_with(Cell::get).unwrap_or(false) {
            // SAFETY: a system allocation, forwarded as received.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees a valid new layout; the old block is copied then freed.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_hands_out_aligned_disjoint_blocks_and_zeroes_them_when_freed() {
        let a = ARENA.alloc(Layout::from_size_align(100, 8).unwrap());
        let b = ARENA.alloc(Layout::from_size_align(4096, 4096).unwrap());
        assert!(!a.is_null() && !b.is_null());
        assert_eq!(b as usize % 4096, 0);
        assert!(ARENA.contains(a) && ARENA.contains(b));
        assert!(b as usize >= a as usize + 100 || a as usize >= b as usize + 4096);
        // SAFETY: `a` is a fresh 100-byte block.
        unsafe {
            std::ptr::write_bytes(a, 0xaa, 100);
        }
        ARENA.dealloc(a, Layout::from_size_align(100, 8).unwrap());
        // SAFETY: the freed block is still mapped; it must read as zeros now.
        assert!((0..100).all(|i| unsafe { *a.add(i) } == 0));
        let again = ARENA.alloc(Layout::from_size_align(64, 8).unwrap());
        assert_eq!(again, a, "freed units are reused");
        ARENA.dealloc(again, Layout::from_size_align(64, 8).unwrap());
        ARENA.dealloc(b, Layout::from_size_align(4096, 4096).unwrap());
    }

    #[test]
    fn what_does_not_fit_is_refused_so_the_system_allocator_serves_it() {
        assert!(ARENA
            .alloc(Layout::from_size_align(ARENA_BYTES, 8).unwrap())
            .is_null());
        assert!(ARENA
            .alloc(Layout::from_size_align(64, 8192).unwrap())
            .is_null());
    }

    #[test]
    fn the_arena_is_excluded_from_dumps() {
        let p = ARENA.alloc(Layout::from_size_align(64, 8).unwrap());
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", ARENA.base.load(Ordering::Relaxed) as usize);
        let block = smaps
            .split("\n")
            .skip_while(|l| !l.starts_with(&start))
            .find(|l| l.starts_with("VmFlags:"))
            .expect("the arena mapping in smaps");
        assert!(block.split_whitespace().any(|f| f == "dd"), "{block}");
        ARENA.dealloc(p, Layout::from_size_align(64, 8).unwrap());
    }
}
