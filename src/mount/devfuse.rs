//! The `/dev/fuse` transport: fuser reads each request, this glue hands it to [`QcowFs`] and turns
//! the answer into fuser's reply. fuser also owns the session's INIT, where the io_uring transport
//! (`uring`) is asked for, and everything that never travels on the ring (forgets, interrupts).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use super::fs::{QcowFs, MAX_IO};

/// fuser's `Filesystem` over the shared request methods.
pub struct DevFuse {
    fs: Arc<QcowFs>,
    /// Set when INIT should ask for FUSE over io_uring (the queues are ready to register).
    want_uring: bool,
    /// Set in INIT when the kernel offered io_uring and the reply asks for it: from then on the
    /// kernel holds new requests until every queue has registered.
    uring_accepted: Arc<AtomicBool>,
    /// Called once when the session ends, before the file system's own end (the ring queues stop
    /// there, so that no request is still being answered when the final flush runs).
    before_destroy: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl DevFuse {
    pub fn new(fs: Arc<QcowFs>) -> Self {
        DevFuse {
            fs,
            want_uring: false,
            uring_accepted: Arc::new(AtomicBool::new(false)),
            before_destroy: None,
        }
    }

    /// Ask for FUSE over io_uring in INIT; the flag returned tells whether the kernel agreed.
    pub fn ask_for_uring(&mut self) -> Arc<AtomicBool> {
        self.want_uring = true;
        self.uring_accepted.clone()
    }

    pub fn before_destroy(&mut self, f: impl FnOnce() + Send + Sync + 'static) {
        self.before_destroy = Some(Box::new(f));
    }
}

/// Serve `session` until it ends, without fuser's unmount at its end. fuser unmounts the mount
/// point's path once the session is over whatever the kernel did: after a clean unmount that
/// second `umount(2)` fails with EINVAL (logged as a warning), or unmounts whatever is now on top
/// at that folder (the file system a qcowfs mount was stacked over, a newer mount). The kernel
/// has unmounted already when the session ends by an unmount; the daemon itself detaches what
/// is left when it ends otherwise (`daemon`).
pub fn serve_without_fuser_unmount(session: fuser::Session<DevFuse>) -> std::io::Result<()> {
    // `spawn` moves the mount handle out of the session into the background handle, whose
    // drop would unmount: it is never dropped.
    let background = std::mem::ManuallyDrop::new(session.spawn()?);
    // SAFETY: `guard` is read out once and `background` is never used nor dropped after: its
    // other fields (the mount handle, a channel sender: a /dev/fuse descriptor the kernel has
    // disconnected) are leaked on purpose until the daemon exits, moments later.
    let guard = unsafe { std::ptr::read(&background.guard) };
    guard
        .join()
        .map_err(|_| std::io::Error::other("the FUSE session thread panicked"))?
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for DevFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Not FUSE_ASYNC_DIO, though it makes a direct-I/O loop device faster (its requests go out
        // concurrently: e2fsck 0.91-1.09 of a raw file against 0.50-0.86, docs/PERFORMANCE.md):
        // kernels without "fuse: invalidate page cache after sync and async direct writes" (2026)
        // leave pages that a buffered reader read during an asynchronous direct write in the page
        // cache after it, stale. Measured on 6.18: 1 of 80 write passes read back old bytes.
        if self.want_uring
            && config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok()
        {
            self.uring_accepted.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(f) = self.before_destroy.take() {
            f();
        }
        self.fs.destroy();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent, name) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.fs.setattr(ino, size) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(ino, flags.0) {
            Ok(open_flags) => reply.opened(FileHandle(0), open_flags),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // This thread's reply buffer, reused: no allocation or page faults per request.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            let want = size.min(MAX_IO) as usize;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.fs.read(ino, offset, &mut buf[..want]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let done = Box::new(move |r: Result<u32, Errno>| match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        });
        self.fs.write(ino, offset, data, done);
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.fs.flush(ino));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.fs.flush(ino));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(ino, offset, |ino, next, kind, name| {
            reply.add(ino, next, kind, name)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        match self.fs.lseek(ino, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let done = Box::new(move |r| reply_empty(reply, r));
        self.fs.fallocate(ino, offset, length, mode, done);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes. ENOSYS (not ENODATA) makes the kernel stop asking: otherwise it asks
        // for security.capability before every write.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, 0, 0, 2, 0, s.bsize, 255, s.bsize);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }
}
