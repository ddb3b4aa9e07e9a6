//! Run a workload on the real write path (chain, disk cache, flush writer, qcow2 commit) with the
//! top layer's host writes and barriers logged through the I/O seam, and the guest operations
//! interleaved with them as marks: what the crash states are built from.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qcowfs::chain::{Chain, OpenOptions};
use qcowfs::disk::{BlockDevice, Disk, DiskOptions};
use qcowfs::io::{HostEvent, WriteLog};

use crate::common::{keys_of, Image};

/// What the guest asked for, in order. Its index is the mark logged when it was issued (a
/// `Durable` is logged once the flush returned).
#[derive(Debug, Clone)]
pub enum GuestOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    /// fsync returned: everything issued before is on stable storage.
    Durable,
}

/// One recorded workload.
pub struct Recording {
    pub name: &'static str,
    /// The top image as it was before the workload (backing files beside it never change).
    pub initial: PathBuf,
    /// The image with its chain, for qemu: the crash states take its place.
    pub image: Image,
    pub events: Vec<HostEvent>,
    pub ops: Vec<GuestOp>,
    /// The guest as qemu read it before the workload.
    pub initial_guest: Vec<u8>,
    /// A check of the guest itself at each crash state (its raw bytes, as qemu reads them),
    /// after the byte-level one: for a file system the workload changed.
    pub guest_check: Option<GuestCheck>,
}

/// A crash state's guest (a raw file) judged: Err says what is wrong.
pub type GuestCheck = fn(&Path) -> Result<(), String>;

/// Drives the disk and logs guest operations as marks.
pub struct Workload {
    disk: Disk,
    log: WriteLog,
    ops: Vec<GuestOp>,
}

impl Workload {
    pub fn write(&mut self, offset: u64, data: Vec<u8>) {
        self.issue(GuestOp::Write {
            offset,
            data: data.clone(),
        });
        self.disk.write_at(offset, &data).expect("guest write");
    }

    pub fn discard(&mut self, offset: u64, len: u64) {
        self.issue(GuestOp::Discard { offset, len });
        self.disk.discard(offset, len).expect("guest discard");
    }

    pub fn fsync(&mut self) {
        self.disk.flush().expect("guest fsync");
        self.issue(GuestOp::Durable);
    }

    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    fn issue(&mut self, op: GuestOp) {
        self.log.mark(self.ops.len() as u64);
        self.ops.push(op);
    }
}

fn snapshot(name: &'static str, image: &Image, dir: &Path) -> (PathBuf, Vec<u8>) {
    let initial = dir.join(format!("{name}.initial"));
    std::fs::copy(&image.path, &initial).expect("copy the image before the workload");
    (initial, image.raw())
}

/// `image` opened read-write with a cache of `cache` bytes, its top layer's host writes and
/// barriers logged.
fn open_workload(name: &str, image: &Image, cache: u64) -> Workload {
    let log = WriteLog::default();
    let chain = Chain::open(
        &image.path,
        &keys_of(image),
        OpenOptions {
            writable: true,
            record: Some(log.clone()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: open {}: {e}", image.path.display()));
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_size: cache,
            read_only: false,
        },
    );
    Workload {
        disk,
        log,
        ops: Vec::new(),
    }
}

/// Run `body` on `image` opened read-write with a small cache (so write-back runs during the
/// workload, not only at fsync), recording the top layer.
pub fn record(
    name: &'static str,
    image: Image,
    dir: &Path,
    cache: u64,
    body: impl FnOnce(&mut Workload),
) -> Recording {
    let (initial, initial_guest) = snapshot(name, &image, dir);
    let mut w = open_workload(name, &image, cache);
    let log = w.log.clone();
    body(&mut w);
    w.fsync();
    let ops = std::mem::take(&mut w.ops);
    drop(w);
    finish(name, initial, image, log, ops, initial_guest, None)
}

/// The workload's disk as the disk layer's own interface, for a guest file-system library (the
/// editing commands) to drive: its writes, discards and flushes are the guest operations.
struct Logged(Mutex<Workload>);

impl Logged {
    fn with<T>(&self, f: impl FnOnce(&mut Workload) -> T) -> T {
        f(&mut self.0.lock().expect("the workload's lock"))
    }
}

impl BlockDevice for Logged {
    fn size(&self) -> u64 {
        self.with(|w| w.disk.size())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> qcowfs::error::Result<()> {
        self.with(|w| w.disk.read_at(offset, buf))
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> qcowfs::error::Result<()> {
        self.with(|w| w.write(offset, data.to_vec()));
        Ok(())
    }
    fn flush(&self) -> qcowfs::error::Result<()> {
        self.with(|w| w.fsync());
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn allocated_bytes(&self) -> qcowfs::error::Result<u64> {
        self.with(|w| w.disk.allocated_bytes())
    }
    fn seek(&self, offset: u64, want_data: bool) -> qcowfs::error::Result<Option<u64>> {
        self.with(|w| w.disk.seek(offset, want_data))
    }
    fn discard(&self, offset: u64, len: u64) -> qcowfs::error::Result<()> {
        self.with(|w| w.discard(offset, len));
        Ok(())
    }
}

/// As [`record`], with `body` given the disk as a device (for the editing commands), and each
/// crash state's guest judged by `check` too.
pub fn record_guest(
    name: &'static str,
    image: Image,
    dir: &Path,
    cache: u64,
    check: GuestCheck,
    body: impl FnOnce(Arc<dyn BlockDevice>),
) -> Recording {
    let (initial, initial_guest) = snapshot(name, &image, dir);
    let w = open_workload(name, &image, cache);
    let log = w.log.clone();
    let logged = Arc::new(Logged(Mutex::new(w)));
    body(logged.clone());
    let Ok(logged) = Arc::try_unwrap(logged) else {
        panic!("{name}: the workload kept the disk")
    };
    let mut w = logged.0.into_inner().expect("the workload's lock");
    w.fsync();
    let ops = std::mem::take(&mut w.ops);
    drop(w);
    finish(name, initial, image, log, ops, initial_guest, Some(check))
}

/// `qcowfs seal` of `image`, recorded: the guest must read the same at every crash state.
pub fn record_seal(name: &'static str, image: Image, dir: &Path) -> Recording {
    let (initial, initial_guest) = snapshot(name, &image, dir);
    let log = WriteLog::default();
    let open = OpenOptions {
        record: Some(log.clone()),
        ..Default::default()
    };
    qcowfs::cmd::seal::seal(
        &image.path,
        &keys_of(&image),
        open,
        Default::default(),
        &|_, _| true,
    )
    .unwrap_or_else(|e| panic!("{name}: seal: {e}"));
    finish(name, initial, image, log, Vec::new(), initial_guest, None)
}

fn finish(
    name: &'static str,
    initial: PathBuf,
    image: Image,
    log: WriteLog,
    ops: Vec<GuestOp>,
    initial_guest: Vec<u8>,
    guest_check: Option<GuestCheck>,
) -> Recording {
    let recording = Recording {
        name,
        initial,
        image,
        events: log.events(),
        ops,
        initial_guest,
        guest_check,
    };
    // The log must hold every change: replayed whole over the initial file it gives the file the
    // workload left (else a write went around the seam and the crash states would miss it).
    let replayed = crate::states::replay_all(&recording);
    let actual = std::fs::read(&recording.image.path).expect("read the image after the workload");
    assert!(
        replayed == actual,
        "{name}: replaying the whole log does not give the image the workload left \
         ({} vs {} bytes, first difference at {:?}): a host write bypassed the recorder",
        replayed.len(),
        actual.len(),
        replayed.iter().zip(&actual).position(|(a, b)| a != b)
    );
    recording
}
