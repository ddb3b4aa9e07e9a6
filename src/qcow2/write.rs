//! The flush writer's half that knows qcow2: allocate clusters, write encrypted data, then refcounts,
//! L2 tables and L1 entries with a barrier between each step, and drop replaced references last. A crash
//! anywhere leaves at most leaked clusters, never an entry that points to unwritten data.

use std::collections::BTreeMap;

use super::header::{self, Header, HeaderUpdate};
use super::image::{Meta, Qcow2Image};
use super::overlap::{MetaKind, MetadataMap};
use super::refcount::Refcounts;
use super::table::{L1Entry, L2Entry, SUBCLUSTERS};
use super::words::{encode_words, read_words};
use super::{FormatError, WriteTarget};
use crate::error::{Context, Error, Result};

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

/// A batch whose data is written (on its way to the disk, not yet durable) into reserved clusters.
/// It holds no data, only where each piece went.
#[derive(Debug)]
pub struct Staged {
    clusters: Vec<StagedCluster>,
}

impl Staged {
    /// Clusters in the batch.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }
}

#[derive(Debug)]
struct StagedCluster {
    guest: u64,
    target: WriteTarget,
    host: u64,
    /// (offset in the cluster, length) of each piece written.
    spans: Vec<(u64, u64)>,
}

/// A staged batch whose new L2 tables are computed and whose refcounts are written: what is left
/// waits for a barrier (`needs_barrier`), then `complete` writes the tables.
#[derive(Debug)]
pub struct Prepared {
    l2_new: BTreeMap<u64, (u64, Vec<u64>)>, // l1 index -> (offset, table)
    releases: Releases,
    old_table: Option<(u64, u64)>,
}

impl Prepared {
    /// Whether data and refcounts must be durable before `complete`: only when an L2 table changes.
    pub fn needs_barrier(&self) -> bool {
        !self.l2_new.is_empty()
    }
}

/// Host clusters whose references a commit drops once the new metadata is durable.
#[derive(Debug, Default)]
struct Releases {
    clusters: Vec<(u64, u64)>, // (host offset, byte length): every cluster overlapping it loses one
}

impl Qcow2Image {
    /// Store `writes`; with `durable`, everything is on stable storage when this returns. Without
    /// it (background write-back), barriers that only durability needs are left for later, never
    /// those that order metadata. On error the on-disk image is consistent (at most leaks) and the
    /// in-memory metadata is re-read from disk, so the caller may retry with the same writes.
    ///
    /// `stage`, `prepare`, `barrier` and `complete` are its steps, for a caller that overlaps the
    /// barrier of one batch with staging the next; each reloads the metadata when it fails.
    pub fn commit(&self, writes: Vec<ClusterWrite>, durable: bool) -> Result<()> {
        let staged = self.stage(writes)?;
        if staged.is_empty() {
            return if durable { self.sync_pending() } else { Ok(()) };
        }
        let prepared = self.prepare(&staged)?;
        if prepared.needs_barrier() {
            self.barrier()?;
        }
        self.complete(prepared, durable)
    }

    /// Reserve host clusters for `writes`, encrypt and write their data (the device starts on it
    /// at once). The next batch may be staged before this one is completed, never prepared.
    pub fn stage(&self, writes: Vec<ClusterWrite>) -> Result<Staged> {
        if writes.is_empty() {
            return Ok(Staged {
                clusters: Vec::new(),
            });
        }
        let result = self.stage_data(writes);
        self.reload_on_error(result)
    }

    /// Compute the new L2 tables of `staged` and write the refcounts (before its barrier). Batches
    /// are prepared and completed one at a time, in order: each builds on the tables the one
    /// before published.
    pub fn prepare(&self, staged: &Staged) -> Result<Prepared> {
        let result = self.prepare_tables(&staged.clusters);
        self.reload_on_error(result)
    }

    /// Make everything written so far durable: the barrier between data and refcounts and the L2
    /// tables that point to them.
    pub fn barrier(&self) -> Result<()> {
        let result = self.file.sync();
        self.reload_on_error(result)
    }

    /// Write the prepared L2 tables (after the barrier), then L1 entries and releases, each step
    /// behind its own barrier; with `durable`, all of it is durable when this returns.
    pub fn complete(&self, prepared: Prepared, durable: bool) -> Result<()> {
        let result = self.complete_tables(prepared, durable);
        self.reload_on_error(result)
    }

    /// Forget what a failed commit left in memory: re-read the metadata from disk.
    pub fn abandon(&self) {
        if let Err(e) = self.reload() {
            log::error!("{e}");
        }
    }

    fn reload_on_error<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.abandon();
        }
        result
    }

    /// Make earlier non-durable commits durable.
    pub fn sync_pending(&self) -> Result<()> {
        if self
            .unsynced
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            if let Err(e) = self.file.sync() {
                self.unsynced
                    .store(true, std::sync::atomic::Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    fn stage_data(&self, writes: Vec<ClusterWrite>) -> Result<Staged> {
        let cs = self.layout.cluster_size();
        // A: reserve host clusters for the clusters that move.
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
        // B: encrypt and write the data, outside the lock, letting the device start on each few
        // MiB while the next are encrypted (the barrier below then waits for less).
        const KICK_BYTES: usize = 4 << 20;
        let mut unkicked = 0;
        let mut clusters = Vec::with_capacity(writes.len());
        for (w, host) in writes.into_iter().zip(hosts) {
            let mut spans = Vec::with_capacity(w.pieces.len());
            for (off, mut bytes) in w.pieces {
                if let Some(cipher) = &self.cipher {
                    let sector = self.sector_number(w.guest + off, host + off);
                    cipher.encrypt(sector, &mut bytes).at(self.path())?;
                }
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

    /// C, first half: the new L2 tables in memory, and the refcounts that the barrier must store
    /// before any of them.
    fn prepare_tables(&self, clusters: &[StagedCluster]) -> Result<Prepared> {
        let mut meta = self.meta.lock();
        let end = meta.end_cluster;
        meta.metadata.set_end(end);
        self.clear_autoclear(&mut meta)?;
        let mut releases = Releases::default();
        let mut l2_new: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new(); // l1 index -> (offset, table)
        for c in clusters {
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
        let old_table = self.write_refcounts(&mut meta)?;
        Ok(Prepared {
            l2_new,
            releases,
            old_table,
        })
    }

    /// C, second half, once data and refcounts are durable (`Prepared::needs_barrier`).
    fn complete_tables(&self, prepared: Prepared, durable: bool) -> Result<()> {
        let cs = self.layout.cluster_size();
        let Prepared {
            l2_new,
            mut releases,
            old_table,
        } = prepared;
        let mut meta = self.meta.lock();
        for (offset, table) in l2_new.values() {
            self.file.write_at(*offset, &encode_words(table))?;
        }
        let mut l1_changed = Vec::new();
        for (&index, (offset, _)) in &l2_new {
            let entry = L1Entry::new(*offset).0;
            if meta.l1[index as usize] != entry {
                l1_changed.push((index, entry));
            }
        }
        // The L2 tables must be durable before an L1 entry points to them, and before a cluster they
        // stopped referencing may be reused (released below). Otherwise the next barrier will do.
        if durable || !l1_changed.is_empty() || !releases.clusters.is_empty() || old_table.is_some()
        {
            self.file.sync()?;
        } else {
            self.unsynced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        for &(index, entry) in &l1_changed {
            self.file.write_at(
                meta.header.l1_table_offset + index * 8,
                &entry.to_be_bytes(),
            )?;
        }
        if !l1_changed.is_empty() {
            self.file.sync()?;
        }
        // The new state is durable: publish it to readers.
        for (&index, (offset, table)) in &l2_new {
            meta.l1[index as usize] = L1Entry::new(*offset).0;
            meta.metadata.add(MetaKind::L2Table, *offset, cs);
            meta.l2_cache
                .put(*offset, std::sync::Arc::new(table.clone()));
        }
        // Last: drop the references the new state no longer holds.
        if let Some((offset, clusters)) = old_table {
            releases.clusters.push((offset, clusters * cs));
            meta.metadata.remove_range(offset, clusters * cs);
        }
        if !releases.clusters.is_empty() {
            let mut freed = Vec::new();
            for &(offset, len) in &releases.clusters {
                self.release(&mut meta, offset, len, &mut freed)?;
            }
            // Storing the decrements may move the refcount table itself (a batch staged meanwhile
            // may have reserved clusters past what it covers); the table it leaves is released too.
            let mut moved = self.write_refcounts(&mut meta)?;
            while let Some((offset, clusters)) = moved {
                meta.metadata.remove_range(offset, clusters * cs);
                self.release(&mut meta, offset, clusters * cs, &mut freed)?;
                moved = self.write_refcounts(&mut meta)?;
            }
            // A lost decrement is only a leak; the next commit's first barrier stores it anyway.
            if durable {
                self.file.sync()?;
            } else {
                self.unsynced
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            for c in freed {
                self.file.punch_hole(c * cs, cs);
            }
        }
        if durable {
            self.unsynced
                .store(false, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }

    /// Point the L2 entry of `w` at its host cluster, copying or creating its L2 table as needed.
    fn update_l2(
        &self,
        meta: &mut Meta,
        l2_new: &mut BTreeMap<u64, (u64, Vec<u64>)>,
        releases: &mut Releases,
        w: &StagedCluster,
    ) -> Result<()> {
        let host = w.host;
        let cs = self.layout.cluster_size();
        let l1_index = self.layout.l1_index(w.guest);
        let i = self.layout.l2_index(w.guest) as usize;
        let ext = self.layout.extended_l2;
        if let std::collections::btree_map::Entry::Vacant(slot) = l2_new.entry(l1_index) {
            let l1 = L1Entry(meta.l1[l1_index as usize]);
            let old = l1.l2_offset();
            let (offset, table) = if old == 0 {
                let fresh = self.alloc_cluster(meta)? * cs;
                (fresh, vec![0u64; (cs / 8) as usize])
            } else if l1.is_copied() {
                (old, self.l2_table(meta, old)?.as_ref().clone())
            } else {
                // Shared with a snapshot: copy the table; the snapshot keeps the old one.
                let copy = self.l2_table(meta, old)?.as_ref().clone();
                let fresh = self.alloc_cluster(meta)? * cs;
                releases.clusters.push((old, cs));
                (fresh, copy)
            };
            slot.insert((offset, table));
        }
        let Some((_, table)) = l2_new.get_mut(&l1_index) else {
            return Ok(());
        };
        let (_, old) = L2Entry::at(table, i, ext);
        let new = match w.target {
            WriteTarget::Allocate => {
                if old.is_compressed() {
                    releases.clusters.push(old.compressed_range(&self.layout));
                } else if old.host_cluster() != 0 {
                    releases.clusters.push((old.host_cluster(), cs));
                }
                L2Entry::data(host, &self.layout)
            }
            WriteTarget::Discard => {
                if old.is_compressed() {
                    releases.clusters.push(old.compressed_range(&self.layout));
                } else if old.host_cluster() != 0 {
                    releases.clusters.push((old.host_cluster(), cs));
                }
                L2Entry::zero(&self.layout)
            }
            WriteTarget::InPlace { .. } if ext => {
                let sc = self.layout.subcluster_size();
                let mut bits = 0u32;
                for &(off, len) in &w.spans {
                    let first = off / sc;
                    let last = (off + len - 1) / sc;
                    for s in first..=last.min(u64::from(SUBCLUSTERS) - 1) {
                        bits |= 1 << s;
                    }
                }
                old.with_subclusters_written(bits)
            }
            WriteTarget::InPlace { .. } => old.without_zero_flag(&self.layout),
        };
        new.store_at(table, i, ext);
        Ok(())
    }

    /// Load the refcounts before the first allocation, check that they can take one, and move the
    /// end of allocation past every cluster they count (see `Refcounts::last_used_cluster`).
    pub(super) fn ensure_refcounts(&self, meta: &mut Meta) -> Result<()> {
        if meta.refcounts.is_none() {
            let h = &meta.header;
            let mut rc = Refcounts::load(
                &self.file,
                h.refcount_table_offset,
                h.refcount_table_clusters.into(),
                h.cluster_bits,
                h.refcount_order,
            )?;
            let file_len = self.file.len()?;
            rc.check_blocks_inside(&self.file, file_len)?;
            if let Some(last) = rc.last_used_cluster(&self.file)? {
                meta.end_cluster = meta.end_cluster.max(last + 1);
            }
            meta.refcounts = Some(rc);
        }
        Ok(())
    }

    /// Find a free host cluster (refcount 0) or grow the file; its refcount becomes 1.
    pub(super) fn alloc_cluster(&self, meta: &mut Meta) -> Result<u64> {
        let cs = self.layout.cluster_size();
        let mut found = None;
        while meta.free_cursor < meta.end_cluster {
            let c = meta.free_cursor;
            meta.free_cursor += 1;
            let rc = self.refcounts(meta)?.get(&self.file, c)?;
            if rc == 0 && !meta.metadata.contains(c * cs) {
                found = Some(c);
                break;
            }
        }
        let cluster = match found {
            Some(c) => c,
            None => {
                let c = meta.end_cluster;
                meta.end_cluster += 1;
                meta.free_cursor = meta.end_cluster;
                c
            }
        };
        self.ensure_block(meta, cluster)?;
        self.refcounts(meta)?.set(&self.file, cluster, 1)?;
        log::trace!("allocated cluster {cluster}");
        Ok(cluster)
    }

    fn refcounts<'m>(&self, meta: &'m mut Meta) -> Result<&'m mut Refcounts> {
        meta.refcounts.as_mut().ok_or_else(|| {
            Error::new(
                self.path(),
                FormatError::Unsupported("refcounts not loaded"),
            )
        })
    }

    /// Make sure a refcount block covers `cluster`, creating it (and growing the table) if needed.
    fn ensure_block(&self, meta: &mut Meta, cluster: u64) -> Result<()> {
        if self.refcounts(meta)?.has_block_for(cluster) {
            return Ok(());
        }
        let per_block = self.refcounts(meta)?.per_block();
        let index = cluster / per_block;
        if index >= self.refcounts(meta)?.table_capacity() {
            self.grow_table(meta, index + 1)?;
            if self.refcounts(meta)?.has_block_for(cluster) {
                return Ok(());
            }
        }
        // New blocks go at the end of the file; usually the block then describes itself.
        let block_cluster = meta.end_cluster;
        meta.end_cluster += 1;
        meta.free_cursor = meta.free_cursor.max(meta.end_cluster);
        let cs = self.layout.cluster_size();
        self.refcounts(meta)?.add_block(index, block_cluster * cs);
        self.ensure_block(meta, block_cluster)?;
        self.refcounts(meta)?.set(&self.file, block_cluster, 1)
    }

    /// Move the refcount table to new clusters at the end of the file with room for `entries`.
    fn grow_table(&self, meta: &mut Meta, entries: u64) -> Result<()> {
        let cs = self.layout.cluster_size();
        let rc = self.refcounts(meta)?;
        let old_clusters = rc.table_clusters;
        let want = (entries * 8).div_ceil(cs).max(old_clusters * 2).max(1);
        if want * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                self.path(),
                FormatError::TooLarge {
                    what: "refcount table",
                    size: want * cs,
                    limit: header::MAX_REFTABLE_BYTES,
                },
            ));
        }
        // A table placed earlier in this same commit was never written: give its clusters back now.
        let (placed_at, placed_clusters) = (rc.table_offset, old_clusters);
        if placed_at != meta.header.refcount_table_offset {
            for c in placed_at / cs..placed_at / cs + placed_clusters {
                self.refcounts(meta)?.set(&self.file, c, 0)?;
                meta.free_cursor = meta.free_cursor.min(c);
            }
        }
        let start = meta.end_cluster;
        meta.end_cluster += want;
        meta.free_cursor = meta.free_cursor.max(meta.end_cluster);
        let rc = self.refcounts(meta)?;
        rc.table_offset = start * cs;
        rc.table_clusters = want;
        rc.table_dirty = true;
        for c in start..start + want {
            self.ensure_block(meta, c)?;
            self.refcounts(meta)?.set(&self.file, c, 1)?;
        }
        Ok(())
    }

    /// Write dirty refcount blocks, then the table if it changed (and the header if it moved). Returns
    /// the old table's (offset, clusters) when it moved, for release once everything is durable.
    fn write_refcounts(&self, meta: &mut Meta) -> Result<Option<(u64, u64)>> {
        let file = &self.file;
        let rc = meta.refcounts.as_mut().ok_or_else(|| {
            Error::new(
                file.path(),
                FormatError::Unsupported("refcounts not loaded"),
            )
        })?;
        rc.write_dirty_blocks(file)?;
        if !rc.table_dirty {
            return Ok(None);
        }
        // New refcount blocks (they always dirty the table) become known metadata.
        for &block in rc.table.iter().filter(|&&b| b != 0) {
            if !meta.metadata.contains(block) {
                meta.metadata.add(
                    MetaKind::RefcountBlock,
                    block,
                    1 << meta.header.cluster_bits,
                );
            }
        }

        let moved = rc.table_offset != meta.header.refcount_table_offset;
        file.write_at(rc.table_offset, &rc.table_bytes())?;
        rc.table_dirty = false;
        if !moved {
            return Ok(None);
        }
        file.sync()?;
        let (at, fields) = HeaderUpdate::RefcountTable {
            offset: rc.table_offset,
            clusters: rc.table_clusters as u32,
        }
        .encode();
        file.write_at(at, &fields)?;
        file.sync()?;
        let old = (
            meta.header.refcount_table_offset,
            u64::from(meta.header.refcount_table_clusters),
        );
        meta.header.refcount_table_offset = rc.table_offset;
        meta.header.refcount_table_clusters = rc.table_clusters as u32;
        meta.metadata.add(
            MetaKind::RefcountTable,
            rc.table_offset,
            rc.table_clusters << meta.header.cluster_bits,
        );
        Ok(Some(old))
    }

    /// Drop one reference from every cluster overlapping [offset, offset + len); clusters that become
    /// free are returned (their space is given back to the host once the refcounts are durable).
    fn release(&self, meta: &mut Meta, offset: u64, len: u64, freed: &mut Vec<u64>) -> Result<()> {
        let cs = self.layout.cluster_size();
        let first = offset / cs;
        let last = (offset + len.max(1) - 1) / cs;
        for c in first..=last {
            let rc = self.refcounts(meta)?;
            let count = rc.get(&self.file, c)?;
            if count == 0 {
                log::warn!(
                    "{}: cluster {:#x} already has refcount 0",
                    self.path().display(),
                    c * cs
                );
                continue;
            }
            rc.set(&self.file, c, count - 1)?;
            log::trace!("released cluster {c}: refcount {}", count - 1);
            if count == 1 {
                meta.free_cursor = meta.free_cursor.min(c);
                freed.push(c);
            }
        }
        Ok(())
    }

    /// Writers that do not understand the autoclear features must clear them (e.g. bitmaps go stale).
    fn clear_autoclear(&self, meta: &mut Meta) -> Result<()> {
        if meta.autoclear_cleared || meta.header.autoclear == 0 {
            return Ok(());
        }
        let (at, bytes) = HeaderUpdate::Autoclear(0).encode();
        self.file.write_at(at, &bytes)?;
        self.file.sync()?;
        meta.header.autoclear = 0;
        meta.autoclear_cleared = true;
        Ok(())
    }

    /// Forget everything in memory and read the header and L1 table again (after a failed commit).
    pub fn reload(&self) -> Result<()> {
        let cs = self.layout.cluster_size();
        let mut first = vec![0u8; cs as usize];
        self.file.read_at(0, &mut first)?;
        let header = Header::parse(&first, self.file.len()?).at(self.path())?;
        let l1 = read_words(&self.file, header.l1_table_offset, header.l1_size as usize)?;
        let metadata = MetadataMap::build(&self.file, &header, &l1, self.snapshots())?;
        let mut meta = self.meta.lock();
        meta.metadata = metadata;
        meta.l1 = l1;
        meta.header = header;
        meta.l2_cache.clear();
        meta.refcounts = None;
        meta.end_cluster = self.file.len()?.div_ceil(cs);
        meta.free_cursor = 0;
        self.ensure_refcounts(&mut meta)
    }
}

impl Qcow2Image {
    /// Make the image stand alone: clear the backing file name, then drop the backing-format
    /// extension. Each step is one write inside the header cluster followed by a barrier; a crash
    /// between them leaves only a stale, ignored backing-format extension.
    pub fn drop_backing_file(&self) -> Result<()> {
        let cs = self.layout.cluster_size() as usize;
        let mut meta = self.meta.lock();
        // Backing file offset (u64) and size (u32), both in the first sector.
        let (at, bytes) = HeaderUpdate::BackingFile { offset: 0, size: 0 }.encode();
        self.file.write_at(at, &bytes)?;
        self.file.sync()?;
        meta.header.backing_file = None;
        meta.header.backing_format = None;
        let mut first = vec![0u8; cs];
        self.file.read_at(0, &mut first)?;
        let start = meta.header.header_length as usize;
        // Every extension but the backing format, up to the end marker; one running past the
        // cluster ends the list.
        let mut kept = Vec::new();
        for ext in header::extensions(&first, start, cs).map_while(|e| e.ok()) {
            if ext.kind != header::EXT_BACKING_FORMAT {
                kept.extend_from_slice(&first[ext.bytes]);
            }
        }
        // The new list, its end marker, and zeros over what followed (the old backing name).
        let mut area = kept;
        area.resize(cs - start, 0);
        self.file.write_at(start as u64, &area)?;
        self.file.sync()
    }
}
