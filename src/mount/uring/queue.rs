//! One FUSE io_uring queue: a thread pinned to its CPU, its own ring, and `DEPTH` entries (a
//! 288-byte header buffer and a payload buffer each) registered with the kernel. A request from a
//! process on that CPU arrives as the completion of an entry's command; the answer is written into
//! the same buffers and a COMMIT_AND_FETCH command both delivers it and re-arms the entry.
//!
//! Requests are answered on this thread, as they arrive, except the slow ones (flush, fsync,
//! discard), which go to the queue's helper thread so that reads from this CPU never wait behind
//! a write-back; partition writes are answered by the partition writer (see `partitions`). Those
//! answers come back through [`Sink`], which wakes the ring with an eventfd.
//!
//! A partition write holds its entry until the partition writer answers, and that writer's drop of
//! `disk`'s pages can wait on a `disk` request (a locked page being read, a dirty page written
//! back) that needs an entry of this very queue. So a queue never lets partition writes hold more
//! than its extra entries: it starts with `SPARE` beyond `DEPTH`, and while fewer than `DEPTH` are
//! free of partition writes it registers another (the kernel takes new entries at any time). The
//! kernel runs one direct write per file at a time (no `FOPEN_PARALLEL_DIRECT_WRITES`), so
//! partition writes hold at most one entry per partition file; `MAX_EXTRA` bounds the growth (and
//! the memory: a payload buffer each, touched only when used). What is left: an entry registered
//! late does not take a request the kernel queued before it (only one that arrives later, or an
//! answer's fetch, does), so a burst of more than `DEPTH + SPARE` partition writes arriving at
//! once on one CPU, with no other request after it, could still wait.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::{Errno, INodeNo};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::answer::{Completer, Outcome, Sink, Slow};
use super::dispatch::{self, Handled};
use super::wire::{self, opcode as fuse_op, InHeader, HEADER_AREA, OP_AREA, RING_HEADER_LEN};
use crate::mount::fs::QcowFs;
use crate::mount::inodes::is_partition;

/// Entries per queue kept free of partition writes: each holds one request being served or
/// waiting.
pub const DEPTH: usize = 4;
/// Entries registered beyond `DEPTH` from the start: the kernel hands out the entry answered last
/// first, so they cost no memory until requests on one CPU outnumber `DEPTH`, and a burst of
/// partition writes that takes every free entry at once still leaves these.
const SPARE: usize = 4;
/// Entries a queue may register beyond `DEPTH` while partition writes hold entries: one per
/// partition file an MBR with all its logical partitions, or a usual GPT, can have.
const MAX_EXTRA: usize = 132;
/// `FUSE_IO_URING_CMD_REGISTER` and `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// The user_data of the eventfd read; entries use their index.
const EVENTFD_TAG: u64 = u64::MAX;
/// How long the ring waits before looking at the stop flag again.
const WAIT: types::Timespec = types::Timespec::new().sec(1);

pub type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// A ring as these queues use it: 128-byte SQEs (the FUSE command needs them), one submitting
/// thread, completions run when that thread waits (the kernel's advice for this protocol).
pub fn new_ring() -> std::io::Result<Ring> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build((2 * (DEPTH + MAX_EXTRA) + 2) as u32)
}

/// One registered entry: the buffers the kernel reads requests into and answers out of. They stay
/// where they are (boxed) from REGISTER until the ring is gone.
struct Slot {
    header: Box<[u8]>,
    payload: Box<[u8]>,
    iov: Box<[libc::iovec; 2]>,
    unique: u64,
    /// Holds a partition write or discard until the partition writer answers it.
    partition: bool,
}

impl Slot {
    /// Zeroed allocations come untouched from the kernel: a payload costs memory only once a
    /// request fills it.
    fn new(payload_len: usize) -> Slot {
        let mut header = vec![0u8; RING_HEADER_LEN].into_boxed_slice();
        let mut payload = vec![0u8; payload_len].into_boxed_slice();
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            },
        ]);
        Slot {
            header,
            payload,
            iov,
            unique: 0,
            partition: false,
        }
    }
}

/// A queue, started: serves requests until the connection ends or `stop` is set.
/// Fields drop in order: the ring (closing it cancels the kernel's hold on every entry) before
/// the buffers it names.
pub struct Queue {
    ring: Ring,
    qid: u16,
    fd: OwnedFd,
    fs: Arc<QcowFs>,
    slots: Vec<Slot>,
    /// Entries the kernel still holds (registered and not ended).
    live: usize,
    /// Entries holding a partition write (see the module doc).
    partition_held: usize,
    sink: Arc<Sink>,
    slow: Slow,
    eventfd_buf: Box<[u8; 8]>,
    /// This round's completions (user_data, result), kept to reuse its allocation.
    arrived: Vec<(u64, i32)>,
    stop: Arc<AtomicBool>,
}

impl Queue {
    pub fn new(
        qid: u16,
        ring: Ring,
        fd: OwnedFd,
        fs: Arc<QcowFs>,
        payload_len: usize,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Queue> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let eventfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let slots = (0..DEPTH + SPARE).map(|_| Slot::new(payload_len)).collect();
        Ok(Queue {
            ring,
            qid,
            fd,
            fs,
            slots,
            live: 0,
            partition_held: 0,
            sink: Arc::new(Sink::new(eventfd)),
            slow: Slow::new(qid),
            eventfd_buf: Box::new([0; 8]),
            arrived: Vec::with_capacity(DEPTH + SPARE + 1),
            stop,
        })
    }

    /// Hand every entry to the kernel. A refusal comes back at once (the kernel then keeps the
    /// whole session on `/dev/fuse`); success shows no completion until a request arrives.
    pub fn register(&mut self) -> std::io::Result<()> {
        for i in 0..self.slots.len() {
            let sqe = self.command(CMD_REGISTER, i, 0);
            self.push(sqe)?;
        }
        self.live = self.slots.len();
        self.ring.submit()?;
        if let Some(cqe) = self.ring.completion().next() {
            return Err(std::io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(())
    }

    /// Serve until every entry has been released by the kernel (the file system was unmounted)
    /// or `stop` is set.
    pub fn serve(mut self) {
        if let Err(e) = self.arm_eventfd() {
            log::error!("io_uring queue {}: {e}", self.qid);
            return;
        }
        while self.live > 0 && !self.stop.load(Ordering::Acquire) {
            let args = types::SubmitArgs::new().timespec(&WAIT);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    log::error!("io_uring queue {}: waiting for requests: {e}", self.qid);
                    return;
                }
            }
            let mut arrived = std::mem::take(&mut self.arrived);
            arrived.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(tag, result) in &arrived {
                if tag == EVENTFD_TAG {
                    if let Err(e) = self.arm_eventfd() {
                        log::error!("io_uring queue {}: {e}", self.qid);
                        return;
                    }
                } else if result < 0 {
                    // The kernel gave the entry back: the session is over (or the entry broke).
                    self.live -= 1;
                    if !matches!(
                        -result,
                        libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED
                    ) {
                        let e = std::io::Error::from_raw_os_error(-result);
                        log::warn!("io_uring queue {}: entry {tag} ended: {e}", self.qid);
                    }
                } else if let Err(e) = self.serve_one(tag as usize) {
                    log::error!("io_uring queue {}: {e}", self.qid);
                    return;
                }
            }
            arrived.clear();
            self.arrived = arrived;
            if let Err(e) = self.answer_deferred() {
                log::error!("io_uring queue {}: {e}", self.qid);
                return;
            }
        }
    }

    /// Entry `i` holds a request: answer it now, or leave it to whoever will.
    fn serve_one(&mut self, i: usize) -> std::io::Result<()> {
        let completer = Completer::new(i, self.sink.clone());
        let slot = &mut self.slots[i];
        let request = InHeader::parse(&slot.header);
        slot.unique = request.unique;
        let sent = wire::payload_len(&slot.header).min(slot.payload.len());
        let op = &slot.header[HEADER_AREA..HEADER_AREA + OP_AREA];
        let handled = dispatch::handle(
            &self.fs,
            &request,
            op,
            &mut slot.payload,
            sent,
            completer,
            &mut self.slow,
        );
        match handled {
            Handled::Now(r) => self.answer(i, r),
            Handled::Later => {
                let partition = matches!(request.opcode, fuse_op::WRITE | fuse_op::FALLOCATE)
                    && is_partition(INodeNo(request.nodeid));
                if partition {
                    self.slots[i].partition = true;
                    self.partition_held += 1;
                    self.keep_entries_free()?;
                }
                Ok(())
            }
        }
    }

    /// Register entries until `DEPTH` are free of partition writes (see the module doc).
    fn keep_entries_free(&mut self) -> std::io::Result<()> {
        while self.slots.len() - self.partition_held < DEPTH {
            if self.slots.len() >= DEPTH + MAX_EXTRA {
                log::warn!(
                    "io_uring queue {}: {} partition writes at once; no more entries",
                    self.qid,
                    self.partition_held
                );
                return Ok(());
            }
            let payload_len = self.slots[0].payload.len();
            self.slots.push(Slot::new(payload_len));
            let sqe = self.command(CMD_REGISTER, self.slots.len() - 1, 0);
            self.push(sqe)?;
            self.live += 1;
        }
        Ok(())
    }

    /// Answer every request that finished elsewhere (or inline through its `Done`).
    fn answer_deferred(&mut self) -> std::io::Result<()> {
        let done = self.sink.take();
        for (i, r) in done {
            let r = r.map(|outcome| match outcome {
                Outcome::Written(n) => wire::write_out(&mut self.slots[i].payload, n),
                Outcome::Empty => 0,
            });
            self.answer(i, r)?;
        }
        Ok(())
    }

    /// Write the answer into entry `i` and commit it (which also fetches the next request).
    fn answer(&mut self, i: usize, r: Result<usize, Errno>) -> std::io::Result<()> {
        let slot = &mut self.slots[i];
        if std::mem::take(&mut slot.partition) {
            self.partition_held -= 1;
        }
        wire::set_answer(&mut slot.header, slot.unique, r);
        let unique = slot.unique;
        let sqe = self.command(CMD_COMMIT_AND_FETCH, i, unique);
        self.push(sqe)
    }

    fn command(&self, op: u32, i: usize, commit_id: u64) -> squeue::Entry128 {
        command_sqe(
            self.fd.as_raw_fd(),
            op,
            self.qid,
            commit_id,
            self.slots[i].iov.as_ptr() as u64,
        )
        .user_data(i as u64)
    }

    /// Read the eventfd again (its completion says deferred answers are waiting).
    fn arm_eventfd(&mut self) -> std::io::Result<()> {
        let read = opcode::Read::new(
            types::Fd(self.sink.eventfd()),
            self.eventfd_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(EVENTFD_TAG);
        self.push(read.into())
    }

    fn push(&mut self, sqe: squeue::Entry128) -> std::io::Result<()> {
        loop {
            // SAFETY: every buffer an SQE names (entry buffers, iovecs, the eventfd buffer) is
            // boxed in `self` and outlives the ring, which is dropped first (field order).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }
}

/// An `IORING_OP_URING_CMD` SQE for `/dev/fuse`: `struct fuse_uring_cmd_req` in the command area,
/// `addr` the two iovecs (header, payload) and `len` 2, which the kernel checks on REGISTER.
pub fn command_sqe(fd: i32, op: u32, qid: u16, commit_id: u64, iov: u64) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(fd), op)
        .cmd(cmd)
        .addr(Some(iov))
        .build();
    with_len(sqe, 2)
}

/// `sqe->len`, which the io-uring crate's UringCmd80 cannot set: the SQE is `struct io_uring_sqe`
/// (repr(C)) followed by the 64 extra bytes, and `len` is the u32 at byte 24.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C), 128 bytes of plain integers (checked above and by the test
    // below against the layout the kernel defines); any byte pattern is a valid value.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    bytes[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_sqes_have_the_kernels_layout() {
        let sqe = command_sqe(
            7,
            CMD_COMMIT_AND_FETCH,
            3,
            0x1122_3344_5566_7788,
            0xdead_beef,
        )
        .user_data(42);
        // SAFETY: as in with_len.
        let b: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(b[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(i32::from_ne_bytes(b[4..8].try_into().unwrap()), 7, "fd");
        assert_eq!(
            u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            2,
            "cmd_op"
        );
        assert_eq!(
            u64::from_ne_bytes(b[16..24].try_into().unwrap()),
            0xdead_beef,
            "addr"
        );
        assert_eq!(u32::from_ne_bytes(b[24..28].try_into().unwrap()), 2, "len");
        assert_eq!(
            u64::from_ne_bytes(b[32..40].try_into().unwrap()),
            42,
            "user_data"
        );
        // The command area starts at byte 48: flags, commit_id, qid.
        assert_eq!(u64::from_ne_bytes(b[48..56].try_into().unwrap()), 0);
        assert_eq!(
            u64::from_ne_bytes(b[56..64].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        assert_eq!(u16::from_ne_bytes(b[64..66].try_into().unwrap()), 3);
    }
}
