//! The `disk-partN` files, and what keeps them and `disk` one truth about the same guest bytes.
//!
//! The kernel caches pages per inode, so two files over the same bytes can disagree: a write through
//! a partition file is not in `disk`'s cached pages, and an mmap write-back through `disk` can put
//! stale bytes over it. The rules here:
//! - Partition files are opened `FOPEN_DIRECT_IO`: they have no page cache, every read comes to us.
//! - `disk` keeps its page cache; a write or discard through a partition file drops `disk`'s cached
//!   pages over the range before the write is applied (a dirty mmap page is written back first, so
//!   it cannot land later over the new bytes) and again after it (pages read in between), and only
//!   then is the write answered.
//! - That invalidation can wait on `disk` pages the kernel has locked for a request of ours, so it
//!   never runs on a request thread: partition writes are handed to one writer thread that answers
//!   them, and request threads stay free to serve `disk`. One thread also keeps their order.
//! - The table is re-read after any write touching a sector it was read from (MBR, every EBR, both
//!   GPT headers and entry arrays) or where a new one would appear; a partition whose range changed
//!   loses its cached size at once, and one that vanished its name.

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use fuser::{Errno, INodeNo, Notifier};
use parking_lot::Mutex;

use super::inodes::{errno, Done, FileNode, DISK, DISK_NAME, PARTITION_BASE, ROOT};
use crate::disk::partition::{read_table, Table};
use crate::disk::views::Window;
use crate::disk::BlockDevice;

/// The partitions of the disk as of the last table read.
struct State {
    table: Option<Table>,
    files: Vec<FileNode>,
}

/// The partition files, re-read when a write may have changed the table.
pub struct PartitionFiles {
    disk: Arc<dyn BlockDevice>,
    state: Mutex<State>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl PartitionFiles {
    pub fn new(disk: Arc<dyn BlockDevice>, notifier: Arc<OnceLock<Notifier>>) -> Self {
        PartitionFiles {
            disk,
            state: Mutex::new(State {
                table: None,
                files: Vec::new(),
            }),
            notifier,
        }
    }

    /// The partition files (the table is read on first use).
    pub fn files(&self) -> Vec<FileNode> {
        let mut state = self.state.lock();
        if state.table.is_none() {
            self.reload(&mut state);
        }
        state.files.clone()
    }

    /// Disk bytes [offset, offset + len) were written or discarded: re-read the table if that may
    /// have changed it. Returns the partition files that changed, for `notify` (the kernel is told
    /// apart, by a thread that serves no requests: see `PartitionWriter::notify`).
    pub fn note_write(&self, offset: u64, len: u64) -> Changed {
        let mut state = self.state.lock();
        let touched = match &state.table {
            Some(table) => table.touched_by(self.disk.size(), offset, len),
            None => return Changed::default(), // never read: the next use reads it
        };
        if !touched {
            return Changed::default();
        }
        let before = std::mem::take(&mut state.files);
        self.reload(&mut state);
        let files = before
            .into_iter()
            .filter_map(|old| match state.files.iter().find(|f| f.ino == old.ino) {
                Some(new) if new.disk_range == old.disk_range => None,
                Some(_) => Some((old, false)),
                None => Some((old, true)),
            })
            .collect();
        Changed { files }
    }

    /// Tell the kernel about partition files that changed: their attributes (a partition file
    /// caches no pages), and the names of those that are gone. Never on a request thread:
    /// dropping a name waits for the root directory's lock, which a lookup holds while its
    /// request waits for a request thread.
    fn notify(&self, changed: Changed) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        for (old, gone) in changed.files {
            let _ = notifier.inval_inode(old.ino, -1, 0);
            if gone {
                let _ = notifier.inval_entry(ROOT, std::ffi::OsStr::new(&old.name));
            }
        }
    }

    fn reload(&self, state: &mut State) {
        let table = read_table(self.disk.as_ref());
        state.files = table
            .partitions
            .iter()
            .map(|p| {
                let name = format!("{DISK_NAME}-part{}", p.number);
                let device: Arc<dyn BlockDevice> =
                    Arc::new(Window::new(name.clone(), self.disk.clone(), p.start, p.len));
                FileNode {
                    ino: INodeNo(PARTITION_BASE + u64::from(p.number)),
                    name,
                    device,
                    disk_range: Some((p.start, p.len)),
                }
            })
            .collect();
        state.table = Some(table);
    }
}

/// Partition files whose range changed (false) or that are gone (true), still to be told to the
/// kernel.
#[derive(Default)]
pub struct Changed {
    files: Vec<(FileNode, bool)>,
}

/// A write or discard through a partition file, and where to answer it; or partition changes a
/// request thread found, to tell the kernel about.
enum Job {
    Notify(Changed),
    Write {
        node: FileNode,
        offset: u64,
        data: Vec<u8>,
        done: Done<u32>,
    },
    Discard {
        node: FileNode,
        offset: u64,
        len: u64,
        done: Done<()>,
    },
}

/// The one thread that applies and answers writes through partition files (see the module doc).
pub struct PartitionWriter {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl PartitionWriter {
    pub fn start(partitions: Arc<PartitionFiles>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new()
            .name("qcowfs-partition-writer".into())
            .spawn(move || {
                for job in rx {
                    run(&partitions, job);
                }
            })
            .ok();
        PartitionWriter {
            jobs: Mutex::new(worker.is_some().then_some(tx)),
            worker: Mutex::new(worker),
        }
    }

    /// Write `data` at `offset` of the partition file `node` (already cut to its size).
    pub fn write(&self, node: FileNode, offset: u64, data: &[u8], done: Done<u32>) {
        let job = Job::Write {
            node,
            offset,
            data: data.to_vec(),
            done,
        };
        if let Err(mpsc::SendError(job)) = self.send(job) {
            fail(job);
        }
    }

    /// Discard [offset, offset + len) of the partition file `node` (already cut to its size).
    pub fn discard(&self, node: FileNode, offset: u64, len: u64, done: Done<()>) {
        let job = Job::Discard {
            node,
            offset,
            len,
            done,
        };
        if let Err(mpsc::SendError(job)) = self.send(job) {
            fail(job);
        }
    }

    /// Tell the kernel about `changed` from the writer thread (a request thread must not wait on
    /// the kernel's directory lock: see `PartitionFiles::notify`).
    pub fn notify(&self, changed: Changed) {
        if !changed.files.is_empty() {
            let _ = self.send(Job::Notify(changed));
        }
    }

    fn send(&self, job: Job) -> Result<(), mpsc::SendError<Job>> {
        match &*self.jobs.lock() {
            Some(tx) => tx.send(job),
            None => Err(mpsc::SendError(job)),
        }
    }

    /// Apply every queued job, then end the thread (before the final flush of the session).
    pub fn finish(&self) {
        self.jobs.lock().take();
        if let Some(worker) = self.worker.lock().take() {
            let _ = worker.join();
        }
    }
}

impl Drop for PartitionWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// No writer thread (it could not start, or the session ended): refuse.
fn fail(job: Job) {
    match job {
        Job::Write { done, .. } => done(Err(Errno::EIO)),
        Job::Discard { done, .. } => done(Err(Errno::EIO)),
        Job::Notify(_) => {}
    }
}

fn run(partitions: &PartitionFiles, job: Job) {
    match job {
        Job::Notify(changed) => partitions.notify(changed),
        Job::Write {
            node,
            offset,
            data,
            done,
        } => {
            let r = apply(partitions, &node, offset, data.len() as u64, || {
                node.device.write_at(offset, &data)
            });
            done(r.map(|()| data.len() as u32))
        }
        Job::Discard {
            node,
            offset,
            len,
            done,
        } => done(apply(partitions, &node, offset, len, || {
            node.device.discard(offset, len)
        })),
    }
}

/// Apply a write or discard of [offset, offset + len) of the partition file `node` with `disk`'s
/// pages over it dropped before and after (see the module doc), then tell the kernel about any
/// partition it changed.
fn apply(
    partitions: &PartitionFiles,
    node: &FileNode,
    offset: u64,
    len: u64,
    op: impl FnOnce() -> crate::Result<()>,
) -> Result<(), Errno> {
    let at = node.disk_range.map_or(offset, |(start, _)| start + offset);
    let drop_disk_pages = || {
        if let Some(notifier) = partitions.notifier.get() {
            let _ = notifier.inval_inode(DISK, at as i64, len as i64);
        }
    };
    drop_disk_pages();
    let result = op();
    drop_disk_pages();
    partitions.notify(partitions.note_write(at, len));
    result.map_err(errno)
}
