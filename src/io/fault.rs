//! Host failures on demand: a `HostIo` wrapper that counts the operations a layer performs on its
//! file (writes, barriers, length changes, holes punched; reads pass through uncounted) and makes
//! one of them fail with a chosen fault: EIO, a full disk, a write cut short, a barrier that fails.
//! The twin of the recorder (host.rs): the recorder shows what a power cut could leave, this shows
//! what the write path does when the host refuses an operation (tests/fault_states).

use std::io;

/// The unit a short write stops at (see `Fault::ShortWrite`).
const PAGE: u64 = 4096;
use std::sync::Arc;

use parking_lot::Mutex;

use super::host::HostIo;

/// The host operations the injector counts: those that change the file or make it durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostOp {
    Write,
    Sync,
    SetLen,
    Punch,
}

impl HostOp {
    pub const ALL: [HostOp; 4] = [HostOp::Write, HostOp::Sync, HostOp::SetLen, HostOp::Punch];

    fn index(self) -> usize {
        self as usize
    }
}

/// How the chosen operation fails. Each fault strikes only the operations it makes sense for, and
/// counts only those: the third `ShortWrite` is the third write, whatever came between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Any operation fails with EIO having done nothing (a device error).
    Eio,
    /// Any operation fails with ENOSPC having done nothing (the host file system is full).
    NoSpace,
    /// A write stores its first part (up to the last page boundary of the file in its first
    /// half: nothing for a write inside one page), then fails with ENOSPC: a write(2) that
    /// returned short, and the retry found the disk full. The kernel copies a write page by page,
    /// so a short write ends at a page boundary; it never tears a sector (an 8-byte L1 entry).
    ShortWrite,
    /// A barrier fails with EIO. The bytes written before it stay in the file: what matters is
    /// that the failure is reported and nothing is claimed durable on its strength.
    FailedBarrier,
}

impl Fault {
    pub const ALL: [Fault; 4] = [
        Fault::Eio,
        Fault::NoSpace,
        Fault::ShortWrite,
        Fault::FailedBarrier,
    ];

    /// Whether this fault can strike `op` (and so whether `op` counts toward its number).
    pub fn strikes(self, op: HostOp) -> bool {
        match self {
            Fault::Eio | Fault::NoSpace => true,
            Fault::ShortWrite => op == HostOp::Write,
            Fault::FailedBarrier => op == HostOp::Sync,
        }
    }

    /// A short name for reports and command lines.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Eio => "eio",
            Fault::NoSpace => "enospc",
            Fault::ShortWrite => "short-write",
            Fault::FailedBarrier => "failed-barrier",
        }
    }
}

/// Where the fault struck: which operation, its number among those the fault counts, and the
/// byte range it concerned (the whole file for a barrier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Struck {
    pub op: HostOp,
    pub index: u64,
    pub offset: u64,
    pub len: u64,
}

/// The plan and what came of it, shared by the injector and the test that reads it afterwards.
#[derive(Debug, Default)]
struct PlanState {
    /// The fault and the number (from 0) of the operation it strikes; None only counts.
    fault: Option<(Fault, u64)>,
    /// Operations seen, by `HostOp`, and how many of them the fault counts.
    seen: [u64; 4],
    eligible: u64,
    struck: Option<Struck>,
}

/// One fault to inject, at most once, into the file it is wired to (cloned handles share it).
/// Counting and deciding happen under one lock, so operations issued from several threads (the
/// commit pipeline's barrier thread) get distinct numbers.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan(Arc<Mutex<PlanState>>);

impl FaultPlan {
    /// Strike operation number `nth` (from 0) of those `fault` applies to.
    pub fn new(fault: Fault, nth: u64) -> Self {
        FaultPlan(Arc::new(Mutex::new(PlanState {
            fault: Some((fault, nth)),
            ..Default::default()
        })))
    }

    /// Strike nothing; only count (the run that tells how many operations there are).
    pub fn counting() -> Self {
        Self::default()
    }

    /// Operations of kind `op` seen so far.
    pub fn seen(&self, op: HostOp) -> u64 {
        self.0.lock().seen[op.index()]
    }

    /// The fault, once it struck.
    pub fn struck(&self) -> Option<Struck> {
        self.0.lock().struck
    }

    /// Count `op` and tell whether it is the one to fail.
    fn next(&self, op: HostOp, offset: u64, len: u64) -> Option<Fault> {
        let mut state = self.0.lock();
        state.seen[op.index()] += 1;
        let (fault, nth) = state.fault?;
        if !fault.strikes(op) {
            return None;
        }
        let index = state.eligible;
        state.eligible += 1;
        if index != nth {
            return None;
        }
        state.struck = Some(Struck {
            op,
            index,
            offset,
            len,
        });
        Some(fault)
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The error a fault gives an operation that does nothing.
fn refusal(fault: Fault) -> io::Error {
    match fault {
        Fault::NoSpace | Fault::ShortWrite => errno(libc::ENOSPC),
        Fault::Eio | Fault::FailedBarrier => errno(libc::EIO),
    }
}

/// Passes every operation to `inner`, except the one its plan fails.
#[derive(Debug)]
pub struct FaultInjector {
    inner: Arc<dyn HostIo>,
    plan: FaultPlan,
}

impl FaultInjector {
    pub fn new(inner: Arc<dyn HostIo>, plan: FaultPlan) -> Self {
        FaultInjector { inner, plan }
    }
}

impl HostIo for FaultInjector {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        match self.plan.next(HostOp::Write, offset, data.len() as u64) {
            None => self.inner.write_all_at(data, offset),
            Some(Fault::ShortWrite) => {
                let half_end = offset + data.len() as u64 / 2;
                let part = (half_end / PAGE * PAGE).saturating_sub(offset) as usize;
                self.inner.write_all_at(&data[..part], offset)?;
                Err(errno(libc::ENOSPC))
            }
            Some(fault) => Err(refusal(fault)),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        match self.plan.next(HostOp::Sync, 0, u64::MAX) {
            None => self.inner.sync_data(),
            Some(fault) => Err(refusal(fault)),
        }
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.plan.next(HostOp::SetLen, len, 0) {
            None => self.inner.set_len(len),
            Some(fault) => Err(refusal(fault)),
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.plan.next(HostOp::Punch, offset, len) {
            None => self.inner.punch_hole(offset, len),
            Some(fault) => Err(refusal(fault)),
        }
    }

    fn start_writeback(&self) -> io::Result<()> {
        self.inner.start_writeback()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFile;

    fn over(plan: &FaultPlan) -> (Arc<MemFile>, FaultInjector) {
        let mem = Arc::new(MemFile::new(vec![b'.'; 8]));
        (mem.clone(), FaultInjector::new(mem, plan.clone()))
    }

    #[test]
    fn a_counting_plan_fails_nothing_and_counts_every_kind_of_operation() {
        let plan = FaultPlan::counting();
        let (mem, f) = over(&plan);
        f.write_all_at(b"ab", 0).unwrap();
        f.write_all_at(b"cd", 2).unwrap();
        f.sync_data().unwrap();
        f.punch_hole(0, 1).unwrap();
        f.set_len(6).unwrap();
        let mut buf = [0u8; 2];
        f.read_at(&mut buf, 0).unwrap();
        assert_eq!(mem.contents(), b"\0bcd..");
        assert_eq!(
            HostOp::ALL.map(|op| plan.seen(op)),
            [2, 1, 1, 1],
            "writes, syncs, set_len, punches (reads are not counted)"
        );
        assert_eq!(plan.struck(), None);
    }

    #[test]
    fn eio_strikes_the_nth_operation_of_any_kind_once_and_leaves_the_file_alone() {
        let plan = FaultPlan::new(Fault::Eio, 2);
        let (mem, f) = over(&plan);
        f.write_all_at(b"ab", 0).unwrap();
        f.sync_data().unwrap();
        let err = f.write_all_at(b"XY", 4).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(mem.contents(), b"ab......");
        f.write_all_at(b"cd", 2).unwrap();
        assert_eq!(mem.contents(), b"abcd....");
        assert_eq!(
            plan.struck(),
            Some(Struck {
                op: HostOp::Write,
                index: 2,
                offset: 4,
                len: 2
            })
        );
    }

    #[test]
    fn a_full_disk_refuses_a_length_change() {
        let plan = FaultPlan::new(Fault::NoSpace, 0);
        let (mem, f) = over(&plan);
        let err = f.set_len(100).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(mem.contents().len(), 8);
    }

    #[test]
    fn a_short_write_counts_only_writes_and_stops_at_a_page_boundary_of_its_first_half() {
        let plan = FaultPlan::new(Fault::ShortWrite, 1);
        let mem = Arc::new(MemFile::new(Vec::new()));
        let f = FaultInjector::new(mem.clone(), plan.clone());
        f.sync_data().unwrap();
        f.write_all_at(&[1u8; 10], 0).unwrap();
        f.sync_data().unwrap();
        // From 1000, 12288 bytes: the first half ends at 7144, its last page boundary is 4096.
        let err = f.write_all_at(&[2u8; 12288], 1000).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let contents = mem.contents();
        assert_eq!(contents.len(), 4096, "stored up to the page boundary");
        assert!(contents[1000..].iter().all(|&b| b == 2));
        assert_eq!(
            plan.struck().map(|s| (s.op, s.index)),
            Some((HostOp::Write, 1))
        );
    }

    #[test]
    fn a_short_write_inside_one_page_stores_nothing() {
        let plan = FaultPlan::new(Fault::ShortWrite, 0);
        let mem = Arc::new(MemFile::new(vec![7u8; 16]));
        let f = FaultInjector::new(mem.clone(), plan);
        // An 8-byte L1 entry: the kernel never tears it.
        assert!(f.write_all_at(&[9u8; 8], 8).is_err());
        assert_eq!(mem.contents(), vec![7u8; 16]);
    }

    #[test]
    fn a_failed_barrier_counts_only_barriers() {
        let plan = FaultPlan::new(Fault::FailedBarrier, 1);
        let (_, f) = over(&plan);
        f.sync_data().unwrap();
        f.write_all_at(b"a", 0).unwrap();
        f.punch_hole(0, 1).unwrap();
        let err = f.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        f.sync_data().unwrap();
        assert_eq!(
            plan.struck().map(|s| (s.op, s.index)),
            Some((HostOp::Sync, 1))
        );
        assert_eq!(plan.seen(HostOp::Sync), 3);
    }
}
