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
    /// have changed it, and tell the kernel about every partition file that changed.
    pub fn note_write(&self, offset: u64, len: u64) {
        let mut state = self.state.lock();
        let touched = match &state.table {
            Some(table) => table.touched_by(self.disk.size(), offset, len),
            None => return, // never read: the next use reads it
        };
        if !touched {
            return;
        }
        let before = std::mem::take(&mut state.files);
        self.reload(&mut state);
        let changed: Vec<(FileNode, bool)> = before
            .into_iter()
            .filter_map(|old| match state.files.iter().find(|f| f.ino == old.ino) {
                Some(new) if new.disk_range == old.disk_range => None,
                Some(_) => Some((old, false)),
                None => Some((old, true)),
            })
            .collect();
        // Told after the lock is dropped: dropping a name waits for the root directory's lock,
        // which a lookup holds while its request waits for `files()`, which takes this lock.
        drop(state);
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        for (old, gone) in changed {
            // Attributes only (offset < 0): a partition file caches no pages.
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

/// A write or discard through a partition file, and where to answer it.
enum Job {
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
    }
}

fn run(partitions: &PartitionFiles, job: Job) {
    let (node, offset, len) = match &job {
        Job::Write {
            node, offset, data, ..
        } => (node, *offset, data.len() as u64),
        Job::Discard {
            node, offset, len, ..
        } => (node, *offset, *len),
    };
    let at = node.disk_range.map_or(offset, |(start, _)| start + offset);
    let drop_disk_pages = || {
        if let Some(notifier) = partitions.notifier.get() {
            let _ = notifier.inval_inode(DISK, at as i64, len as i64);
        }
    };
    drop_disk_pages();
    let result = match &job {
        Job::Write { data, .. } => node.device.write_at(offset, data),
        Job::Discard { .. } => node.device.discard(offset, len),
    };
    drop_disk_pages();
    partitions.note_write(at, len);
    match (job, result) {
        (Job::Write { data, done, .. }, Ok(())) => done(Ok(data.len() as u32)),
        (Job::Discard { done, .. }, Ok(())) => done(Ok(())),
        (Job::Write { done, .. }, Err(e)) => done(Err(errno(e))),
        (Job::Discard { done, .. }, Err(e)) => done(Err(errno(e))),
    }
}
