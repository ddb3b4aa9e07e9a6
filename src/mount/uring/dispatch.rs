//! A request from the ring, decoded and handed to [`QcowFs`], its answer encoded into the entry's
//! payload buffer: the io_uring counterpart of `devfuse`, calling the same methods, so that both
//! transports answer alike. Operations this file system does not implement get ENOSYS, as fuser's
//! defaults give them on `/dev/fuse`. Access control is the kernel's: without allow_other it
//! passes no other user's request (fuser's own owner check is the same rule).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use fuser::{Errno, INodeNo};

use super::answer::{Completer, Slow};
use super::wire::{self, opcode, InHeader};
use crate::mount::fs::QcowFs;

/// What became of a request: answered (the payload bytes written, or an error), or to be
/// answered through its `Completer`.
pub enum Handled {
    Now(Result<usize, Errno>),
    Later,
}

/// Serve one request. `op` is its in-struct, `payload[..sent]` what came with it (a name, write
/// data); the answer's out-struct or data goes into `payload`.
pub fn handle(
    fs: &Arc<QcowFs>,
    request: &InHeader,
    op: &[u8],
    payload: &mut [u8],
    sent: usize,
    completer: Completer,
    slow: &mut Slow,
) -> Handled {
    let ino = INodeNo(request.nodeid);
    let now = |r| Handled::Now(r);
    match request.opcode {
        opcode::LOOKUP => {
            // The answer goes over the name, so the lookup is done before it is written.
            let found = fs.lookup(ino, OsStr::from_bytes(wire::name(&payload[..sent])));
            now(found.map(|(attr, ttl)| wire::entry_out(payload, &attr, ttl)))
        }
        opcode::GETATTR => now(fs
            .getattr(ino)
            .map(|(attr, ttl)| wire::attr_out(payload, &attr, ttl))),
        opcode::SETATTR => now(fs
            .setattr(ino, wire::setattr_size(op))
            .map(|(attr, ttl)| wire::attr_out(payload, &attr, ttl))),
        opcode::OPEN => now(fs
            .open(ino, wire::open_in(op))
            .map(|flags| wire::open_out(payload, flags.bits()))),
        opcode::OPENDIR => now(Ok(wire::open_out(payload, 0))),
        opcode::RELEASE | opcode::RELEASEDIR => now(Ok(0)),
        opcode::READ => {
            let (offset, size) = wire::read_in(op);
            let want = (size as usize).min(payload.len());
            now(fs.read(ino, offset, &mut payload[..want]))
        }
        opcode::WRITE => {
            let (offset, size) = wire::write_in(op);
            let data = &payload[..(size as usize).min(sent)];
            fs.write(ino, offset, data, completer.written());
            Handled::Later
        }
        opcode::FLUSH | opcode::FSYNC => {
            let fs = fs.clone();
            let done = completer.empty();
            slow.run(move || done(fs.flush(ino)));
            Handled::Later
        }
        opcode::FALLOCATE => {
            let (offset, length, mode) = wire::fallocate_in(op);
            let fs = fs.clone();
            let done = completer.empty();
            slow.run(move || fs.fallocate(ino, offset, length, mode, done));
            Handled::Later
        }
        opcode::READDIR => {
            let (offset, size) = wire::read_in(op);
            let limit = (size as usize).min(payload.len());
            let buf = &mut payload[..limit];
            let mut at = 0;
            let r = fs.readdir(ino, offset, |ino, next, kind, name| {
                match wire::dirent(buf, at, ino.0, next, kind, name) {
                    Some(end) => {
                        at = end;
                        false
                    }
                    None => true,
                }
            });
            now(r.map(|()| at))
        }
        opcode::LSEEK => {
            let (offset, whence) = wire::lseek_in(op);
            now(fs
                .lseek(ino, offset, whence)
                .map(|at| wire::lseek_out(payload, at)))
        }
        opcode::STATFS => {
            let s = fs.statfs();
            now(Ok(wire::statfs_out(payload, s.blocks, s.bsize)))
        }
        // No extended attributes: ENOSYS makes the kernel stop asking (see `devfuse`).
        opcode::GETXATTR | opcode::LISTXATTR => now(Err(Errno::ENOSYS)),
        _ => now(Err(Errno::ENOSYS)),
    }
}
