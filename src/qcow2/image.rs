//! One open qcow2 layer: header, L1 table in memory, an LRU of L2 tables, and the read path that maps a
//! guest range to its source (plan first, then do the I/O without holding the metadata lock).

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use super::alloc::Allocator;
use super::compress::decompress;
use super::data_refs;
use super::header::{Encryption, Header};
use super::layout::Layout;
use super::overlap::MetadataMap;
use super::snapshot::{self, Snapshot};
use super::snapshot_l1::{self, SnapshotL1, SnapshotTables};
use super::table::{ClusterSource, L1Entry, L2Entry};
use super::words::{decode_words, read_words};
use super::FormatError;
use crate::crypto::SectorCipher;
use crate::error::{Context, Error, Result};
use crate::io::HostFile;

/// Bytes of L2 tables kept in memory per image.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// An L2 table as decoded words (two per entry with extended L2).
pub(super) type L2Table = Arc<Vec<u64>>;

/// Mutable metadata, under one lock held only for table lookups and updates.
#[derive(Debug)]
pub(super) struct Meta {
    pub header: Header,
    pub l1: Vec<u64>,
    pub l2_cache: LruCache<u64, L2Table>,
    /// Refcounts, the end of the file and the free cursor (only the committer changes them).
    pub alloc: Allocator,
    pub autoclear_cleared: bool,
    /// Host clusters holding metadata: data must never point into them.
    pub metadata: MetadataMap,
}

/// One qcow2 layer of a chain.
#[derive(Debug)]
pub struct Qcow2Image {
    pub(super) file: HostFile,
    pub(super) layout: Layout,
    pub(super) cipher: Option<Box<dyn SectorCipher>>,
    pub(super) meta: Mutex<Meta>,
    snapshots: Vec<Snapshot>,
    /// Pieces of snapshot L1 tables, read when a snapshot is (see `snapshot_l1`).
    pub(super) snapshot_tables: SnapshotTables,
    /// The last decompressed cluster, so consecutive blocks of one compressed cluster decompress once.
    last_decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// A background commit left writes without their final barrier (see `commit`).
    pub(super) unsynced: std::sync::atomic::AtomicBool,
    /// Held by the one commit pipeline running.
    pub(super) commit_lock: Mutex<()>,
    /// A barrier failed: nothing more is committed (see `barrier`).
    pub(super) poisoned: std::sync::atomic::AtomicBool,
    /// Held shared by a read from the moment it maps a cluster until it has read it (outside the
    /// metadata lock). A commit takes it exclusively once, after publishing its new state and
    /// before releasing what the old one referenced, so no cluster a read mapped under the old
    /// state is punched or reused under that read (QEMU's in-flight request tracking does the
    /// same job). Lock order: pin, then `meta`; the committer holds neither while it waits.
    pub(super) read_pins: RwLock<()>,
}

/// Is a guest cluster ours to overwrite in place, or must the flush writer allocate it?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteTarget {
    /// Allocated in this layer with refcount 1: write in place at `host`.
    InPlace { host: u64 },
    /// Unallocated, zero, compressed or shared: allocate a new cluster and write it whole.
    Allocate,
    /// Make the cluster read as zeros and drop its data (discard, punch hole).
    Discard,
}

impl Qcow2Image {
    /// Read and validate the header and the L1 table. A writable image must not have overlapping
    /// metadata; a read-only one is served as far as it is intact.
    pub fn open(file: HostFile, header: Header, writable: bool) -> Result<Self> {
        let path = file.path().to_path_buf();
        let layout = Layout::new(header.cluster_bits, header.version, header.extended_l2());
        let file_len = file.len()?;
        let l1 = read_words(&file, header.l1_table_offset, header.l1_size as usize)?;
        check_l1(&path, &layout, &l1, file_len)?;
        let snapshots = if header.nb_snapshots > 0 {
            snapshot::read_table(&file, header.snapshots_offset, header.nb_snapshots).at(&path)?
        } else {
            Vec::new()
        };
        let metadata = MetadataMap::build(&file, &header, &l1, &snapshots)?;
        if writable {
            refuse_overlap(&path, &metadata)?;
        }
        let tables = (L2_CACHE_BYTES / layout.cluster_size()).max(16) as usize;
        let alloc = Allocator::new(&header, file_len);
        let header_bits = header.cluster_bits;
        let meta = Meta {
            header,
            l1,
            l2_cache: LruCache::new(NonZeroUsize::new(tables).unwrap_or(NonZeroUsize::MIN)),
            alloc,
            autoclear_cleared: false,
            metadata,
        };
        let image = Qcow2Image {
            file,
            layout,
            cipher: None,
            meta: Mutex::new(meta),
            snapshots,
            snapshot_tables: SnapshotTables::new(header_bits, snapshot_l1::DEFAULT_CACHE_BYTES),
            last_decompressed: Mutex::new(None),
            unsynced: std::sync::atomic::AtomicBool::new(false),
            commit_lock: Mutex::new(()),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            read_pins: RwLock::new(()),
        };
        if writable {
            // Refcounts that cannot take an allocation refuse the mount now, not the first flush.
            image.check_refcounts_for_writing(&mut image.meta.lock())?;
        }
        Ok(image)
    }

    /// The refcounts a writer trusts: able to take an allocation, counting every metadata
    /// cluster, and every data cluster as often as the active L2 tables name it (`open`, and
    /// `reload` after a failed commit).
    pub(super) fn check_refcounts_for_writing(&self, meta: &mut Meta) -> Result<()> {
        self.ensure_refcounts(meta)?;
        self.check_metadata_counted(meta)?;
        let Meta { l1, alloc, .. } = meta;
        data_refs::check_data_counted(&self.file, &self.layout, l1, alloc)
    }

    /// Every metadata cluster must have a refcount: one that has none shows refcounts that lost
    /// track of what the image uses (damage), and the allocator, which trusts them, would hand
    /// out clusters still in use (a data cluster some L2 entry names, or the header itself).
    /// QEMU leaves this to `qemu-img check`; a writer that trusts such refcounts corrupts data.
    fn check_metadata_counted(&self, meta: &mut Meta) -> Result<()> {
        let cs = self.layout.cluster_size();
        let Meta {
            alloc, metadata, ..
        } = meta;
        // The refcount structures aside: an enlarged table may name blocks (and sit in clusters)
        // that no refcount describes yet, and the allocator never hands out metadata anyway; an
        // uncounted header, L1 or L2 table is what shows that data refcounts were lost.
        let counted = |w: &str| !w.starts_with("refcount");
        for (cluster, what) in metadata.clusters().filter(|&(_, w)| counted(w)) {
            if alloc.refcount(&self.file, cluster)? == 0 {
                return Err(Error::new(
                    self.path(),
                    FormatError::Uncounted {
                        what,
                        offset: cluster * cs,
                    },
                ));
            }
        }
        Ok(())
    }

    pub fn set_cipher(&mut self, cipher: Box<dyn SectorCipher>) {
        self.cipher = Some(cipher);
    }

    /// Whether a key was set (an encrypted layer opened without one reads only its metadata).
    pub fn has_cipher(&self) -> bool {
        self.cipher.is_some()
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn file(&self) -> &HostFile {
        &self.file
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn header(&self) -> Header {
        self.meta.lock().header.clone()
    }

    pub fn virtual_size(&self) -> u64 {
        self.meta.lock().header.size
    }

    pub fn encryption(&self) -> Encryption {
        self.meta.lock().header.encryption
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The L1 table of an internal snapshot, checked (see [`SnapshotTables::table`]).
    pub fn snapshot_l1(&self, snapshot: &Snapshot) -> Result<SnapshotL1> {
        self.snapshot_tables.table(&self.file, snapshot)
    }

    /// Entry `index` of the snapshot table `l1` (None past its end), through the bounded cache.
    pub(super) fn snapshot_l1_entry(&self, l1: &SnapshotL1, index: u64) -> Result<Option<u64>> {
        self.snapshot_tables.entry(&self.file, l1, index)
    }

    /// Load (or find in the cache) the L2 table at `offset`.
    pub(super) fn l2_table(&self, meta: &mut Meta, offset: u64) -> Result<L2Table> {
        if let Some(t) = meta.l2_cache.get(&offset) {
            return Ok(t.clone());
        }
        // Not `read_words`: a table in a last cluster the file only partly holds reads as zeros.
        let mut raw = vec![0u8; self.layout.cluster_size() as usize];
        self.file.read_at(offset, &mut raw)?;
        let table = Arc::new(decode_words(&raw));
        meta.l2_cache.put(offset, table.clone());
        Ok(table)
    }

    /// The L2 entry of the guest cluster containing `guest`, and the L1 entry above it.
    pub(super) fn entry(
        &self,
        meta: &mut Meta,
        guest: u64,
    ) -> Result<(L1Entry, Option<(u64, L2Entry)>)> {
        self.entry_in(meta, None, guest)
    }

    /// Like `entry`, through the L1 table `view` (a snapshot's) instead of the active one.
    fn entry_in(
        &self,
        meta: &mut Meta,
        view: Option<&SnapshotL1>,
        guest: u64,
    ) -> Result<(L1Entry, Option<(u64, L2Entry)>)> {
        let l1_index = self.layout.l1_index(guest) as usize;
        let word = match view {
            Some(l1) => self.snapshot_l1_entry(l1, l1_index as u64)?,
            None => meta.l1.get(l1_index).copied(),
        };
        let Some(word) = word else {
            return Ok((L1Entry(0), None));
        };
        let l1 = L1Entry(word);
        let l2_offset = l1.l2_offset();
        if l2_offset == 0 {
            return Ok((l1, None));
        }
        let table = self.l2_table(meta, l2_offset)?;
        let i = self.layout.l2_index(guest) as usize;
        let (_, entry) = L2Entry::at(&table, i, self.layout.extended_l2);
        Ok((l1, Some((l2_offset, entry))))
    }

    /// Where the bytes at `guest` come from, and for how many bytes (at most `len`) that holds.
    pub fn map(&self, guest: u64, len: u64) -> Result<(ClusterSource, u64)> {
        self.map_in(None, guest, len)
    }

    /// `map` through the L1 table `view` (a snapshot's) instead of the active one.
    pub fn map_in(
        &self,
        view: Option<&SnapshotL1>,
        guest: u64,
        len: u64,
    ) -> Result<(ClusterSource, u64)> {
        let cs = self.layout.cluster_size();
        let mut meta = self.meta.lock();
        let (_, found) = self.entry_in(&mut meta, view, guest)?;
        let Some((l2_offset, entry)) = found else {
            // No L2 table: the whole L2 span is unallocated.
            let span_left = self.layout.l2_span() - guest % self.layout.l2_span();
            return Ok((ClusterSource::Backing, len.min(span_left)));
        };
        let in_cluster = self.layout.offset_in_cluster(guest);
        let sc_size = self.layout.subcluster_size();
        let sub = (in_cluster / sc_size) as u32;
        let (source, runs) = self.checked_source(&meta, l2_offset, entry, sub, guest)?;
        let run_end = if matches!(source, ClusterSource::Compressed { .. }) {
            cs
        } else {
            (u64::from(sub) + u64::from(runs)) * sc_size
        };
        let n = len.min(run_end - in_cluster);
        let source = match source {
            ClusterSource::Data { host } => ClusterSource::Data {
                host: host + (in_cluster - u64::from(sub) * sc_size),
            },
            other => other,
        };
        Ok((source, n))
    }

    /// Read `buf` at guest offset `guest`; what this layer does not hold is read through `below`.
    /// `guest` and `buf.len()` are multiples of 512 when the layer is encrypted.
    pub fn read(
        &self,
        guest: u64,
        buf: &mut [u8],
        below: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.read_in(None, guest, buf, below)
    }

    /// `read` through the L1 table `view` (a snapshot's) instead of the active one.
    pub fn read_in(
        &self,
        view: Option<&SnapshotL1>,
        guest: u64,
        buf: &mut [u8],
        below: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = guest + done as u64;
            let pin = self.read_pins.read();
            let (source, n) = self.map_in(view, at, (buf.len() - done) as u64)?;
            let piece = &mut buf[done..done + n as usize];
            match source {
                ClusterSource::Backing => {
                    drop(pin); // the layers below are other files
                    below(at, piece)?
                }
                ClusterSource::Zero => piece.fill(0),
                ClusterSource::Data { host } => self.read_data(at, host, piece)?,
                ClusterSource::Compressed { host, size } => {
                    let cluster = self.decompressed(at, host, size)?;
                    let off = self.layout.offset_in_cluster(at) as usize;
                    piece.copy_from_slice(&cluster[off..off + piece.len()]);
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Read (and decrypt) data bytes of guest offset `guest` stored at `host`.
    pub(super) fn read_data(&self, guest: u64, host: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_at(host, buf)?;
        if let Some(cipher) = &self.cipher {
            cipher
                .decrypt(self.sector_number(guest, host), buf)
                .at(self.path())?;
        }
        Ok(())
    }

    /// QEMU numbers legacy AES sectors by guest offset, LUKS sectors by host offset.
    pub(super) fn sector_number(&self, guest: u64, host: u64) -> u64 {
        match self.encryption() {
            Encryption::Luks => host / 512,
            _ => guest / 512,
        }
    }

    fn decompressed(&self, guest: u64, host: u64, size: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((at, data)) = &*self.last_decompressed.lock() {
            if *at == host {
                return Ok(data.clone());
            }
        }
        let mut packed = vec![0u8; size as usize];
        self.file.read_at(host, &mut packed)?;
        let mut out = vec![0u8; self.layout.cluster_size() as usize];
        let kind = self.meta.lock().header.compression;
        let cluster_start = guest - self.layout.offset_in_cluster(guest);
        decompress(kind, &packed, &mut out)
            .map_err(|_| Error::new(self.path(), FormatError::Decompress(cluster_start)))?;
        let out = Arc::new(out);
        *self.last_decompressed.lock() = Some((host, out.clone()));
        Ok(out)
    }

    /// Bytes of guest data this layer stores (data and compressed clusters; zero clusters hold none).
    pub fn allocated_bytes(&self) -> Result<u64> {
        let size = self.virtual_size();
        let mut total = 0;
        let mut at = 0;
        while at < size {
            let (source, n) = self.map(at, size - at)?;
            if matches!(
                source,
                ClusterSource::Data { .. } | ClusterSource::Compressed { .. }
            ) {
                total += n;
            }
            at += n;
        }
        Ok(total)
    }

    /// Up to `max` allocated data clusters, (guest offset, host offset), spread evenly over the first
    /// few thousand this layer maps (entries a read would refuse are skipped).
    pub fn sample_data_clusters(&self, max: usize) -> Result<Vec<(u64, u64)>> {
        const SCAN: usize = 4096;
        let size = self.virtual_size();
        let cs = self.layout.cluster_size();
        let mut found = Vec::new();
        let mut damaged = 0;
        let mut at = 0;
        while at < size && found.len() < SCAN && damaged < SCAN {
            // A damaged entry says nothing about the rest: it is skipped (reading it fails later,
            // named), so one bad entry does not stop the salvage tools that sample.
            let Ok((source, n)) = self.map(at, size - at) else {
                damaged += 1;
                at = (at / cs + 1) * cs;
                continue;
            };
            if let ClusterSource::Data { host } = source {
                found.push((at, host));
            }
            at += n;
        }
        let step = found.len().div_ceil(max.max(1)).max(1);
        Ok(found.into_iter().step_by(step).collect())
    }

    /// Can this layer mark clusters as reading zeros (v3 zero flag, or v2 without a backing file)?
    pub fn can_discard(&self) -> bool {
        let meta = self.meta.lock();
        meta.header.version >= 3 || meta.header.backing_file.is_none()
    }

    /// Decide how the flush writer treats the guest cluster at `guest`. The entry gets every check
    /// a read makes (`checked_source`) and those a write needs besides (`checked_for_write`), so a
    /// write through a damaged entry is refused when it is made, before anything is stored.
    pub fn write_target(&self, guest: u64) -> Result<WriteTarget> {
        let mut meta = self.meta.lock();
        let (l1, found) = self.entry(&mut meta, guest)?;
        let Some((l2_offset, entry)) = found else {
            return Ok(WriteTarget::Allocate);
        };
        self.checked_for_write(&meta, l2_offset, entry, guest)?;
        let owned = l1.is_copied()
            && entry.is_copied()
            && !entry.is_compressed()
            && entry.host_cluster() != 0
            && (self.layout.extended_l2
                || entry.word & super::table::ZERO == 0
                || self.layout.version < 3);
        if !owned {
            return Ok(WriteTarget::Allocate);
        }
        // Written in place, the cluster must be one the file holds: an entry far past the end
        // (2^56 - 64 KiB, say) would take the write and then fail every flush with EFBIG.
        let host = entry.host_cluster();
        let end = meta.alloc.end_cluster() * self.layout.cluster_size();
        if host >= end {
            return Err(Error::new(
                self.path(),
                FormatError::BeyondEnd {
                    what: "data cluster",
                    offset: host,
                    len: self.layout.cluster_size(),
                    file_len: end,
                },
            ));
        }
        Ok(WriteTarget::InPlace { host })
    }

    /// The one check of an L2 entry (`entry`, read from the table at `l2_offset`), made before a
    /// read follows it: it decodes (an aligned host offset, coherent subcluster bits, no
    /// compressed cluster at 0), and the data it names is not metadata, nor its own L2 table.
    pub(super) fn checked_source(
        &self,
        meta: &Meta,
        l2_offset: u64,
        entry: L2Entry,
        sub: u32,
        guest: u64,
    ) -> Result<(ClusterSource, u32)> {
        let (source, runs) = entry.source(&self.layout, sub, guest).at(self.path())?;
        match source {
            ClusterSource::Data { host } => {
                self.refuse_metadata(meta, l2_offset, "data cluster", host, 1)?
            }
            ClusterSource::Compressed { host, .. } => {
                self.refuse_metadata(meta, l2_offset, "compressed cluster", host, 1)?
            }
            ClusterSource::Backing | ClusterSource::Zero => {}
        }
        Ok((source, runs))
    }

    /// `checked_source` for every subcluster, and then for every host cluster the entry names
    /// even where a read would not look (a zero cluster's preallocated one): a write overwrites
    /// or releases it, and releasing metadata would corrupt the image. Used by `write_target`
    /// and by the commit itself for every entry it replaces (a discard never calls
    /// `write_target`).
    pub(super) fn checked_for_write(
        &self,
        meta: &Meta,
        l2_offset: u64,
        entry: L2Entry,
        guest: u64,
    ) -> Result<()> {
        let mut sub = 0;
        while sub < self.layout.subclusters() {
            let (_, runs) = self.checked_source(meta, l2_offset, entry, sub, guest)?;
            sub += runs.max(1);
        }
        let (what, host, len) = if entry.is_compressed() {
            let (host, size) = entry.compressed_range(&self.layout);
            ("compressed cluster", host, size)
        } else {
            ("data cluster", entry.host_cluster(), 1)
        };
        if host != 0 {
            self.refuse_metadata(meta, l2_offset, what, host, len)?;
        }
        Ok(())
    }

    /// Refuse host bytes [host, host + len) that touch metadata or the L2 table at `l2_offset`.
    fn refuse_metadata(
        &self,
        meta: &Meta,
        l2_offset: u64,
        what: &'static str,
        host: u64,
        len: u64,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        let last = host.saturating_add(len.max(1) - 1);
        let touches = |at: u64| meta.metadata.contains(at) || at & !(cs - 1) == l2_offset;
        // Every cluster of the range: a compressed entry may span three (its size field allows
        // two clusters of data starting inside a first one).
        let mut clusters = (host / cs..=last / cs).map(|c| c * cs);
        if clusters.any(touches) {
            return Err(Error::new(
                self.path(),
                FormatError::Overlap { what, offset: host },
            ));
        }
        Ok(())
    }
}

/// Every L1 entry names an L2 table at a cluster boundary inside the file (`open`, and `reload`
/// after a failed commit: what the disk holds then is checked as on the first open).
pub(super) fn check_l1(path: &Path, layout: &Layout, l1: &[u64], file_len: u64) -> Result<()> {
    let end_cluster = file_len.div_ceil(layout.cluster_size());
    for &word in l1 {
        let l2 = L1Entry(word).l2_offset();
        if l2 == 0 {
            continue;
        }
        if l2 % layout.cluster_size() != 0 {
            return Err(Error::new(
                path,
                FormatError::Misaligned {
                    what: "L2 table",
                    offset: l2,
                    align: layout.cluster_size(),
                },
            ));
        }
        if l2 >= end_cluster * layout.cluster_size() {
            return Err(Error::new(
                path,
                FormatError::BeyondEnd {
                    what: "L2 table",
                    offset: l2,
                    len: layout.cluster_size(),
                    file_len,
                },
            ));
        }
    }
    Ok(())
}

/// A writable image's metadata must not overlap (`open`, `reload`).
pub(super) fn refuse_overlap(path: &Path, metadata: &MetadataMap) -> Result<()> {
    match &metadata.overlap {
        Some(overlap) => Err(Error::new(
            path,
            FormatError::Overlap {
                what: overlap_what(overlap),
                offset: overlap_offset(overlap),
            },
        )),
        None => Ok(()),
    }
}

fn overlap_what(e: &FormatError) -> &'static str {
    match e {
        FormatError::Overlap { what, .. } => what,
        _ => "metadata",
    }
}

fn overlap_offset(e: &FormatError) -> u64 {
    match e {
        FormatError::Overlap { offset, .. } => *offset,
        _ => 0,
    }
}

#[cfg(test)]
#[path = "image/tests.rs"]
mod tests;
