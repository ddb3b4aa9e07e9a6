//! The commit pipeline: how new cluster contents become image state, with a barrier between each
//! step so that a crash anywhere leaves at most leaked clusters, never an entry that points to
//! unwritten data. The types make the order: a batch is `Staged` (data written into reserved
//! clusters), then `Prepared` (new L2 tables computed, refcounts written), and only its barrier
//! turns it into `Ordered`, the one state that may be completed (L2 tables written, barrier, L1
//! entries, barrier, publish, release what was replaced). `Pipeline` overlaps one batch's barrier
//! with staging the next; one pipeline runs at a time per image.
//!
//! The metadata lock is held only to reserve clusters, to compute tables, to store refcounts (page
//! cache writes) and to publish: L2 and L1 writes and every barrier run outside it, so a read
//! never waits for the disk to sync. A barrier that fails poisons the image (see `barrier`).

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::MutexGuard;

use super::alloc::TableMove;
use super::header::HeaderUpdate;
use super::image::{Meta, Qcow2Image};
use super::l2_update::{NewTables, Releases, StagedCluster};
use super::overlap::MetaKind;
use super::table::L1Entry;
use super::words::encode_words;
use super::WriteTarget;
use crate::error::{Context, Result};

/// A batch of at least this many bytes has half of it encrypted on a second thread: below it,
/// starting the thread costs more than the overlap saves.
const PARALLEL_ENCRYPTION_BYTES: usize = 256 << 10;

/// New contents for (part of) one guest cluster of the top layer.
#[derive(Debug)]
pub struct ClusterWrite {
    /// Guest offset of the cluster's first byte.
    pub guest: u64,
    pub target: WriteTarget,
    /// Plaintext pieces: (offset in the cluster, bytes), multiples of 512. With `Allocate` they must
    /// cover the whole cluster.
    pub pieces: Vec<(u64, Vec<u8>)>,
}

impl ClusterWrite {
    /// Bytes of data it carries (what a batch is measured in).
    pub fn bytes(&self) -> usize {
        self.pieces.iter().map(|(_, b)| b.len()).sum()
    }
}

/// What a commit promises when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Everything committed so far is on stable storage (fsync, close, umount).
    Synced,
    /// The image is consistent after a crash at any point (the barriers that order metadata
    /// after the data it points to are paid), but the last commits may be lost (write-back).
    Ordered,
}

/// A batch whose data is written (on its way to the disk, not yet durable) into reserved clusters.
#[derive(Debug)]
struct Staged {
    clusters: Vec<StagedCluster>,
}

/// A staged batch whose new L2 tables are computed and whose refcounts are written; it waits for
/// its barrier.
#[derive(Debug)]
struct Prepared {
    l2_new: NewTables,
    releases: Releases,
    /// The refcount table moved while the refcounts were stored: the old one is released last.
    moved_table: Option<(u64, u64)>,
}

/// A prepared batch behind its barrier: data and refcounts are durable (or nothing needed it).
/// Only `Barrier::wait` makes one.
#[derive(Debug)]
struct Ordered(Prepared);

/// A batch's barrier, usually running on its own thread while the next batch is staged.
struct Barrier {
    prepared: Prepared,
    sync: DataSync,
}

/// A barrier's sync, kept with its result wherever it ran, so that `Barrier::wait` is the one
/// place a failed sync poisons the image.
enum DataSync {
    /// The batch changes no L2 table: nothing waits for its data.
    Unneeded,
    /// On its own thread, overlapping the staging of the next batch.
    Running(std::thread::JoinHandle<std::io::Result<()>>),
    /// Already done on the flush thread: no thread could be made (a pids limit). The batch then
    /// costs its barrier in full instead of overlapping it with the next.
    Ran(std::io::Result<()>),
}

/// Set once a barrier had to run on the flush thread: said once in the log, not per batch.
static BARRIER_INLINE_LOGGED: AtomicBool = AtomicBool::new(false);

impl Prepared {
    /// Whether data and refcounts must be durable before completing: only when an L2 table changes.
    fn needs_barrier(&self) -> bool {
        !self.l2_new.is_empty()
    }

    /// Start the barrier on a thread (none when nothing needs it; here when no thread can be made).
    fn start_barrier(self, image: &Qcow2Image) -> Barrier {
        let sync = match self.needs_barrier() {
            false => DataSync::Unneeded,
            true => {
                let io = image.file.io_handle();
                let on_thread = io.clone();
                let thread = std::thread::Builder::new()
                    .name("qcowfs-barrier".into())
                    .spawn(move || on_thread.sync_data());
                match thread {
                    Ok(thread) => DataSync::Running(thread),
                    Err(e) => {
                        if !BARRIER_INLINE_LOGGED.swap(true, Ordering::Relaxed) {
                            log::warn!(
                                "{}: no thread for a write barrier ({e}): barriers now run on \
                                 the flush thread, and writes are slower",
                                image.path().display()
                            );
                        }
                        DataSync::Ran(io.sync_data())
                    }
                }
            }
        };
        Barrier {
            prepared: self,
            sync,
        }
    }
}

impl Barrier {
    fn wait(self, image: &Qcow2Image) -> Result<Ordered> {
        let synced = match self.sync {
            DataSync::Unneeded => Ok(()),
            DataSync::Running(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the barrier thread panicked"))),
            DataSync::Ran(synced) => synced,
        };
        synced.at(image.path()).inspect_err(|e| image.poison(e))?;
        Ok(Ordered(self.prepared))
    }
}

/// Batches committed in order, each one's barrier running while the next is staged. Each batch
/// carries a `T` (what the caller marks stored) that is handed back once the batch is complete.
/// Dropped before `finish` (an error): reserved clusters are forgotten by re-reading the metadata.
pub struct Pipeline<'i, T> {
    image: &'i Qcow2Image,
    _one_at_a_time: MutexGuard<'i, ()>,
    in_flight: Option<(Barrier, T)>,
}

impl Qcow2Image {
    /// The image's commit pipeline; waits while another one runs.
    pub fn pipeline<T>(&self) -> Pipeline<'_, T> {
        Pipeline {
            image: self,
            _one_at_a_time: self.commit_lock.lock(),
            in_flight: None,
        }
    }

    /// Store `writes` as one batch; with `Synced`, everything is on stable storage when this
    /// returns. On error the on-disk image is consistent (at most leaks) and the in-memory metadata
    /// is re-read from disk, so the caller may retry with the same writes.
    pub fn commit(&self, writes: Vec<ClusterWrite>, durability: Durability) -> Result<()> {
        let mut pipeline = self.pipeline();
        pipeline.submit(writes, ())?;
        pipeline.finish(durability).map(|_| ())
    }
}

impl<T> Pipeline<'_, T> {
    /// Stage `batch` (its data goes to the device), complete the batch before it (whose barrier
    /// ran meanwhile), then prepare this one and start its barrier. Returns the payload of the
    /// batch completed, if any (an empty batch is complete at once: its own payload).
    pub fn submit(&mut self, batch: Vec<ClusterWrite>, payload: T) -> Result<Option<T>> {
        let image = self.image;
        image.refuse_if_poisoned()?;
        if batch.is_empty() {
            return Ok(Some(payload));
        }
        let staged = image.reload_on_error(image.stage(batch))?;
        let done = match self.in_flight.take() {
            Some((barrier, before)) => {
                image.complete(barrier.wait(image), Durability::Ordered)?;
                Some(before)
            }
            None => None,
        };
        // After the batch before is complete: this one's tables build on what it published.
        let prepared = image.reload_on_error(image.prepare(&staged))?;
        self.in_flight = Some((prepared.start_barrier(image), payload));
        Ok(done)
    }

    /// Complete the last batch; with `Synced`, everything committed so far is durable when this
    /// returns. Returns the last batch's payload.
    pub fn finish(mut self, durability: Durability) -> Result<Option<T>> {
        let image = self.image;
        match self.in_flight.take() {
            Some((barrier, last)) => {
                image.complete(barrier.wait(image), durability)?;
                Ok(Some(last))
            }
            None if durability == Durability::Synced => image.sync_pending().map(|_| None),
            None => Ok(None),
        }
    }
}

/// Where to split `jobs` so that each part holds about half of its `bytes`.
fn half_by_bytes(jobs: &[(ClusterWrite, u64)], bytes: usize) -> usize {
    let mut seen = 0;
    jobs.iter()
        .position(|(w, _)| {
            seen += w.bytes();
            seen >= bytes / 2
        })
        .map_or(jobs.len(), |i| i + 1)
}

impl<T> Drop for Pipeline<'_, T> {
    fn drop(&mut self) {
        if let Some((barrier, _)) = self.in_flight.take() {
            // Its clusters are reserved in memory only: start again from what the disk holds.
            let _ = barrier.wait(self.image);
            self.image.abandon();
        }
    }
}

impl Qcow2Image {
    /// Reserve host clusters for `writes`, encrypt and write their data (the device starts on it
    /// at once).
    fn stage(&self, writes: Vec<ClusterWrite>) -> Result<Staged> {
        // Before any data changes: a bitmap that claims to be in sync must not outlive a write.
        self.clear_autoclear()?;
        let cs = self.layout.cluster_size();
        let hosts: Vec<u64> = {
            let mut meta = self.meta.lock();
            self.ensure_refcounts(&mut meta)?;
            let mut hosts = Vec::with_capacity(writes.len());
            for w in writes.iter() {
                hosts.push(match w.target {
                    WriteTarget::InPlace { host } => host,
                    WriteTarget::Allocate => self.alloc_cluster(&mut meta)? * cs,
                    WriteTarget::Discard => 0,
                });
            }
            hosts
        };
        let bytes: usize = writes.iter().map(ClusterWrite::bytes).sum();
        let mut jobs: Vec<(ClusterWrite, u64)> = writes.into_iter().zip(hosts).collect();
        if self.cipher.is_none() || bytes < PARALLEL_ENCRYPTION_BYTES {
            return self.write_staged(
                jobs.into_iter()
                    .map(|(w, host)| self.encrypt_cluster(w, host)),
            );
        }
        // The second half of the batch is encrypted on another thread while this one encrypts and
        // writes the first: on two CPUs a batch takes half its encryption less. One hand-over per
        // batch (one per cluster cost more than it saved). The writes stay on this thread and in
        // the batch's order, so what reaches the device (and what the crash and fault tests
        // enumerate) is the same as without it.
        let second_half = parking_lot::Mutex::new(jobs.split_off(half_by_bytes(&jobs, bytes)));
        let encrypt_second = || {
            let jobs = std::mem::take(&mut *second_half.lock());
            jobs.into_iter()
                .map(|(w, host)| self.encrypt_cluster(w, host))
                .collect::<Vec<_>>()
        };
        std::thread::scope(|s| {
            // A thread that cannot be made (a pids limit) leaves the second half to this thread.
            let helper = std::thread::Builder::new().spawn_scoped(s, encrypt_second);
            let first = jobs
                .into_iter()
                .map(|(w, host)| self.encrypt_cluster(w, host));
            let second = std::iter::once(helper).flat_map(|helper| match helper {
                Ok(helper) => helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(_) => encrypt_second(),
            });
            self.write_staged(first.chain(second))
        })
    }

    /// Encrypt one cluster's pieces in place (nothing for a plain image).
    fn encrypt_cluster(&self, mut w: ClusterWrite, host: u64) -> Result<(ClusterWrite, u64)> {
        if let Some(cipher) = &self.cipher {
            for (off, bytes) in w.pieces.iter_mut() {
                let sector = self.sector_number(w.guest + *off, host + *off);
                cipher.encrypt(sector, bytes).at(self.path())?;
            }
        }
        Ok((w, host))
    }

    /// Write encrypted clusters into their reserved host clusters, in order.
    fn write_staged(
        &self,
        encrypted: impl Iterator<Item = Result<(ClusterWrite, u64)>>,
    ) -> Result<Staged> {
        // Letting the device start on each few MiB while the next are written (the barrier then
        // waits for less).
        const KICK_BYTES: usize = 4 << 20;
        let mut unkicked = 0;
        let mut clusters = Vec::new();
        for next in encrypted {
            let (w, host) = next?;
            let mut spans = Vec::with_capacity(w.pieces.len());
            for (off, bytes) in w.pieces {
                self.file.write_at(host + off, &bytes)?;
                spans.push((off, bytes.len() as u64));
                unkicked += bytes.len();
                if unkicked >= KICK_BYTES {
                    self.file.start_writeback();
                    unkicked = 0;
                }
            }
            clusters.push(StagedCluster {
                guest: w.guest,
                target: w.target,
                host,
                spans,
            });
        }
        Ok(Staged { clusters })
    }

    /// The new L2 tables in memory, and the refcounts the barrier must store before any of them.
    fn prepare(&self, staged: &Staged) -> Result<Prepared> {
        let mut meta = self.meta.lock();
        let mut releases = Releases::default();
        let mut l2_new = NewTables::new();
        for c in &staged.clusters {
            self.update_l2(&mut meta, &mut l2_new, &mut releases, c)?;
        }
        // Writes in place usually leave their L2 table as it was: then it is neither rewritten nor
        // waited for, and such a commit costs one barrier (or none, in the background).
        let mut unchanged = Vec::new();
        for (&index, (offset, table)) in &l2_new {
            if L1Entry(meta.l1[index as usize]).l2_offset() == *offset
                && self.l2_table(&mut meta, *offset)?.as_slice() == table.as_slice()
            {
                unchanged.push(index);
            }
        }
        for index in unchanged {
            l2_new.remove(&index);
        }
        let moved_table = self.store_refcounts(&mut meta)?.map(|m| m.old);
        Ok(Prepared {
            l2_new,
            releases,
            moved_table,
        })
    }

    /// Write the L2 tables, then L1 entries, each behind its barrier; publish; release what the
    /// new state no longer references. With `Synced`, all of it is durable when this returns.
    fn complete(&self, ordered: Result<Ordered>, durability: Durability) -> Result<()> {
        let result =
            ordered.and_then(|Ordered(prepared)| self.complete_tables(prepared, durability));
        self.reload_on_error(result)
    }

    fn complete_tables(&self, prepared: Prepared, durability: Durability) -> Result<()> {
        let synced = durability == Durability::Synced;
        let cs = self.layout.cluster_size();
        let Prepared {
            l2_new,
            mut releases,
            moved_table,
        } = prepared;
        // Unpublished tables: a table rewritten in place only gains entries whose data is durable,
        // so a reader loading it now sees either version, both valid.
        for (offset, table) in l2_new.values() {
            self.file.write_at(*offset, &encode_words(table))?;
        }
        let (l1_offset, l1_changed) = {
            let meta = self.meta.lock();
            let changed: Vec<(u64, u64)> = l2_new
                .iter()
                .map(|(&index, (offset, _))| (index, L1Entry::new(*offset).0))
                .filter(|&(index, entry)| meta.l1[index as usize] != entry)
                .collect();
            (meta.header.l1_table_offset, changed)
        };
        // The L2 tables must be durable before an L1 entry points to them, and before a cluster
        // they stopped referencing may be reused (released below). Otherwise the next barrier does.
        if synced || !l1_changed.is_empty() || !releases.0.is_empty() || moved_table.is_some() {
            self.barrier()?;
        } else {
            self.unsynced.store(true, Ordering::Release);
        }
        for &(index, entry) in &l1_changed {
            self.file
                .write_at(l1_offset + index * 8, &entry.to_be_bytes())?;
        }
        if !l1_changed.is_empty() {
            self.barrier()?;
        }
        // The new state is durable: publish it to readers. The map tracks clusters up to the end
        // of the file, which the allocator moved since (new L2 tables are among those clusters).
        let mut meta = self.meta.lock();
        let end = meta.alloc.end_cluster();
        meta.metadata.set_end(end);
        for (&index, (offset, table)) in &l2_new {
            meta.l1[index as usize] = L1Entry::new(*offset).0;
            meta.metadata.add(MetaKind::L2Table, *offset, cs);
            meta.l2_cache
                .put(*offset, std::sync::Arc::new(table.clone()));
        }
        // Last: drop the references the new state no longer holds.
        if let Some((offset, clusters)) = moved_table {
            releases.0.push((offset, clusters * cs));
            meta.metadata.remove_range(offset, clusters * cs);
        }
        if releases.0.is_empty() {
            drop(meta);
        } else {
            // Reads that mapped a released cluster under the old state finish first.
            drop(meta);
            drop(self.read_pins.write());
            let mut meta = self.meta.lock();
            let mut freed = Vec::new();
            for &(offset, len) in &releases.0 {
                meta.alloc.release(&self.file, offset, len, &mut freed)?;
            }
            // Storing the decrements may move the refcount table itself (a batch staged meanwhile
            // may have reserved clusters past what it covers); the table it leaves is released too.
            while let Some(moved) = self.store_refcounts(&mut meta)? {
                let (offset, clusters) = moved.old;
                meta.metadata.remove_range(offset, clusters * cs);
                meta.alloc
                    .release(&self.file, offset, clusters * cs, &mut freed)?;
            }
            drop(meta);
            // A lost decrement is only a leak; the next commit's first barrier stores it anyway.
            if synced {
                self.barrier()?;
            } else {
                self.unsynced.store(true, Ordering::Release);
            }
            for c in freed {
                self.file.punch_hole(c * cs, cs);
            }
        }
        if synced {
            self.unsynced.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Write the dirty refcounts. A changed table is written only after a barrier (its new
    /// entries point to new blocks, which must be durable first); when it moved, it is made
    /// durable and the header pointed to it. The barriers run with the lock released (the
    /// committer is the only one changing the allocator, readers never look at it).
    fn store_refcounts(&self, meta: &mut MutexGuard<'_, Meta>) -> Result<Option<TableMove>> {
        let table_changed = {
            let Meta {
                alloc, metadata, ..
            } = &mut **meta;
            alloc.store_blocks(&self.file, metadata)?
        };
        if !table_changed {
            return Ok(None);
        }
        MutexGuard::unlocked(meta, || self.barrier())?;
        let Some(moved) = meta.alloc.store_table(&self.file)? else {
            return Ok(None);
        };
        MutexGuard::unlocked(meta, || -> Result<()> {
            self.barrier()?;
            let (at, fields) = HeaderUpdate::RefcountTable {
                offset: moved.offset,
                clusters: moved.clusters as u32,
            }
            .encode();
            self.file.write_at(at, &fields)?;
            self.barrier()
        })?;
        meta.header.refcount_table_offset = moved.offset;
        meta.header.refcount_table_clusters = moved.clusters as u32;
        let Meta {
            alloc, metadata, ..
        } = &mut **meta;
        alloc.table_committed(&moved, metadata);
        Ok(Some(moved))
    }

    /// Make earlier non-durable commits durable.
    pub fn sync_pending(&self) -> Result<()> {
        self.refuse_if_poisoned()?;
        if self.unsynced.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.barrier() {
                self.unsynced.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// A barrier. One that fails poisons the image: the kernel may have dropped the dirty pages
    /// it could not write and marked them clean, so what the page cache shows is no longer what
    /// the disk holds, and a later barrier that succeeds would prove nothing (QEMU treats it the
    /// same way). Every later commit and barrier then fails with EIO.
    pub(super) fn barrier(&self) -> Result<()> {
        self.refuse_if_poisoned()?;
        self.file.sync().inspect_err(|e| self.poison(e))
    }

    fn poison(&self, e: &crate::Error) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            log::error!(
                "{e}: a barrier (fsync) failed; writes to this image are refused from now on, \
                 since data the kernel reported as written may be lost: unmount, then check \
                 the image with qcowfs check"
            );
        }
    }

    fn refuse_if_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(crate::Error::new(
                self.path(),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    /// Forget what a failed commit left in memory: re-read the metadata from disk. When that
    /// fails (unreadable, or metadata `open` would refuse), what memory holds cannot be trusted
    /// and what the disk holds is damaged: nothing more is committed.
    pub fn abandon(&self) {
        if let Err(e) = self.reload() {
            if !self.poisoned.swap(true, Ordering::AcqRel) {
                log::error!(
                    "{e}: re-reading the metadata after a failed write failed; writes to this \
                     image are refused from now on: unmount, then check it with qcowfs check"
                );
            }
        }
    }

    fn reload_on_error<R>(&self, result: Result<R>) -> Result<R> {
        if result.is_err() {
            self.abandon();
        }
        result
    }

    /// Forget everything in memory and read the header and L1 table again (after a failed commit).
    pub fn reload(&self) -> Result<()> {
        let cs = self.layout.cluster_size();
        let mut first = vec![0u8; cs as usize];
        self.file.read_at(0, &mut first)?;
        let file_len = self.file.len()?;
        let header = super::Header::parse(&first, file_len).at(self.path())?;
        let l1 =
            super::words::read_words(&self.file, header.l1_table_offset, header.l1_size as usize)?;
        // The checks of `open`: what a failed commit left on disk is trusted no more than that.
        super::image::check_l1(self.path(), &self.layout, &l1, file_len)?;
        let metadata =
            super::overlap::MetadataMap::build(&self.file, &header, &l1, self.snapshots())?;
        super::image::refuse_overlap(self.path(), &metadata)?;
        let mut meta = self.meta.lock();
        meta.alloc = super::alloc::Allocator::new(&header, file_len);
        meta.metadata = metadata;
        meta.l1 = l1;
        meta.header = header;
        meta.l2_cache.clear();
        self.check_refcounts_for_writing(&mut meta)
    }
}

#[cfg(test)]
#[path = "commit/encrypted_tests.rs"]
mod encrypted_tests;
#[cfg(test)]
#[path = "commit/tests.rs"]
mod tests;
