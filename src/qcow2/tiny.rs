//! Small qcow2 images built in memory for unit tests: a builder that lays out the header, the
//! refcount table and its one block, the L1 table, L2 tables and data clusters cluster by cluster,
//! counting every cluster it places in the refcount block; and a host file over shared memory that
//! logs its reads, so a test can see what a layer read and what it wrote.

use std::io;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use super::header::{RawHeader, INCOMPAT_COMPRESSION_TYPE, INCOMPAT_EXTENDED_L2, MAGIC};
use super::layout::Layout;
use super::table::{L2Entry, COMPRESSED, COPIED};
use super::{Compression, Header, Qcow2Image};
use crate::error::Result;
use crate::io::{HostFile, HostIo, MemFile};

/// The name in-memory images carry in error messages.
pub(crate) const PATH: &str = "tiny.qcow2";

/// Where the builder puts its fixed structures (cluster indexes).
pub(crate) const REFCOUNT_TABLE: u64 = 1;
pub(crate) const REFCOUNT_BLOCK: u64 = 2;
pub(crate) const L1_TABLE: u64 = 3;

/// An image under construction. Refcounts are 16 bits; every structure fits one cluster.
#[derive(Debug, Clone)]
pub(crate) struct TinyImage {
    pub layout: Layout,
    pub size: u64,
    pub crypt_method: u32,
    pub compression: Compression,
    pub backing: Option<String>,
    bytes: Vec<u8>,
    l1: Vec<u64>,
    /// One per cluster of `bytes`.
    refcounts: Vec<u64>,
}

impl TinyImage {
    /// A version 3 image of `size` bytes with clusters of 2^`cluster_bits` bytes.
    pub fn new(cluster_bits: u32, size: u64) -> Self {
        Self::with_layout(Layout::new(cluster_bits, 3, false), size)
    }

    pub fn with_layout(layout: Layout, size: u64) -> Self {
        let cs = layout.cluster_size();
        let l1_entries = size.div_ceil(layout.l2_span()).max(1);
        assert!(l1_entries * 8 <= cs, "the L1 table must fit one cluster");
        TinyImage {
            layout,
            size,
            crypt_method: 0,
            compression: Compression::Zlib,
            backing: None,
            bytes: vec![0; 4 * cs as usize],
            l1: vec![0; l1_entries as usize],
            refcounts: vec![1; 4],
        }
    }

    pub fn cluster_size(&self) -> u64 {
        self.layout.cluster_size()
    }

    /// Append a zeroed cluster with refcount 1; its host offset.
    pub fn cluster(&mut self) -> u64 {
        let at = self.bytes.len() as u64;
        self.bytes
            .resize(self.bytes.len() + self.cluster_size() as usize, 0);
        self.refcounts.push(1);
        at
    }

    /// The L2 table mapping `guest`, allocated (and entered COPIED into the L1 table) if need be.
    pub fn l2_for(&mut self, guest: u64) -> u64 {
        let i = self.layout.l1_index(guest) as usize;
        if self.l1[i] == 0 {
            self.l1[i] = self.cluster() | COPIED;
        }
        self.l1[i] & super::table::OFFSET_MASK
    }

    /// Store the L2 entry of the guest cluster containing `guest`.
    pub fn set_entry(&mut self, guest: u64, entry: L2Entry) {
        let table = self.l2_for(guest);
        let i = self.layout.l2_index(guest);
        let at = (table + i * self.layout.l2_entry_size()) as usize;
        self.bytes[at..at + 8].copy_from_slice(&entry.word.to_be_bytes());
        if self.layout.extended_l2 {
            self.bytes[at + 8..at + 16].copy_from_slice(&entry.bitmap.to_be_bytes());
        }
    }

    /// A new cluster holding `data` (at most a cluster), mapped COPIED at the guest cluster of
    /// `guest` (all subclusters allocated with extended L2); its host offset.
    pub fn data(&mut self, guest: u64, data: &[u8]) -> u64 {
        let host = self.cluster();
        self.put(host, data);
        let entry = L2Entry::data(host, &self.layout);
        self.set_entry(guest, entry);
        host
    }

    /// `data` compressed with this image's compression type into a new cluster, mapped at the
    /// guest cluster of `guest`; its host offset. `data` must be one cluster.
    pub fn compressed(&mut self, guest: u64, data: &[u8]) -> u64 {
        assert_eq!(data.len() as u64, self.cluster_size());
        let packed = pack(self.compression, data);
        assert!(packed.len() as u64 <= self.cluster_size(), "incompressible");
        let host = self.cluster();
        self.put(host, &packed);
        let sectors = (packed.len() as u64).div_ceil(512);
        let word = COMPRESSED | host | ((sectors - 1) << self.layout.compressed_size_shift());
        self.set_entry(guest, L2Entry { word, bitmap: 0 });
        host
    }

    /// Patch raw bytes of the file (growing it when they lie past its end).
    pub fn put(&mut self, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        self.bytes[offset as usize..end].copy_from_slice(data);
    }

    pub fn set_l1(&mut self, index: usize, word: u64) {
        self.l1[index] = word;
    }

    /// Override the refcount of host cluster `cluster` (a shared or a leaked cluster).
    pub fn set_refcount(&mut self, cluster: u64, value: u64) {
        self.refcounts[cluster as usize] = value;
    }

    /// The header fields this image is built with.
    pub fn raw_header(&self) -> RawHeader {
        let cs = self.cluster_size();
        let mut incompatible = 0;
        if self.layout.extended_l2 {
            incompatible |= INCOMPAT_EXTENDED_L2;
        }
        if self.compression == Compression::Zstd {
            incompatible |= INCOMPAT_COMPRESSION_TYPE;
        }
        RawHeader {
            magic: u32::from_be_bytes(MAGIC),
            version: self.layout.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.layout.cluster_bits,
            size: self.size,
            crypt_method: self.crypt_method,
            l1_size: self.l1.len() as u32,
            l1_table_offset: L1_TABLE * cs,
            refcount_table_offset: REFCOUNT_TABLE * cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: u8::from(self.compression == Compression::Zstd),
        }
    }

    /// The image file: header (and backing name after it), refcount table and block, L1 table,
    /// and every cluster placed so far.
    pub fn bytes(&self) -> Vec<u8> {
        let cs = self.cluster_size() as usize;
        let mut out = self.bytes.clone();
        let mut raw = self.raw_header();
        let mut header = raw.encode();
        if let Some(name) = &self.backing {
            raw.backing_file_offset = header.len() as u64;
            raw.backing_file_size = name.len() as u32;
            header = raw.encode();
            header.extend_from_slice(name.as_bytes());
        }
        out[..header.len()].copy_from_slice(&header);
        let rt = REFCOUNT_TABLE as usize * cs;
        out[rt..rt + 8].copy_from_slice(&(REFCOUNT_BLOCK * cs as u64).to_be_bytes());
        let rb = REFCOUNT_BLOCK as usize * cs;
        assert!(
            self.refcounts.len() * 2 <= cs,
            "the refcount block must cover the file"
        );
        for (i, &n) in self.refcounts.iter().enumerate() {
            out[rb + 2 * i..rb + 2 * i + 2].copy_from_slice(&(n as u16).to_be_bytes());
        }
        let l1 = L1_TABLE as usize * cs;
        for (i, &word) in self.l1.iter().enumerate() {
            out[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    pub fn open(&self, writable: bool) -> Result<Qcow2Image> {
        open_bytes(self.bytes(), writable)
    }

    /// Open over a shared memory file that logs reads (see [`Probe`]).
    pub fn open_probed(&self, writable: bool) -> Result<(Qcow2Image, Probe)> {
        let probe = Probe::new(self.bytes());
        let image = open_file(
            HostFile::over(Path::new(PATH), std::sync::Arc::new(probe.clone())),
            writable,
        )?;
        Ok((image, probe))
    }
}

/// One cluster of compressed `data`, as QEMU stores it: raw deflate or a zstd frame.
pub(crate) fn pack(kind: Compression, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match kind {
        Compression::Zlib => {
            let mut enc =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        }
        Compression::Zstd => zstd::bulk::compress(data, 3).unwrap(),
    }
}

/// Parse the header of `bytes` and open them as an image.
pub(crate) fn open_bytes(bytes: Vec<u8>, writable: bool) -> Result<Qcow2Image> {
    open_file(HostFile::in_memory(Path::new(PATH), bytes), writable)
}

pub(crate) fn open_file(file: HostFile, writable: bool) -> Result<Qcow2Image> {
    let len = file.len()?;
    let mut head = vec![0u8; 4096.min(len as usize)];
    file.read_exact_at(0, &mut head)?;
    let want = Header::bytes_wanted(&head).map_err(|e| crate::Error::new(PATH, e))?;
    let mut first = vec![0u8; want.min(len as usize)];
    file.read_exact_at(0, &mut first)?;
    let header = Header::parse(&first, len).map_err(|e| crate::Error::new(PATH, e))?;
    Qcow2Image::open(file, header, writable)
}

/// A memory file shared between the layer that owns it and the test that looks at it; it logs
/// every read as (offset, length).
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub mem: Arc<MemFile>,
    reads: Arc<Mutex<Vec<(u64, usize)>>>,
    /// While set, every write and hole punch fails with this errno (a full host disk: barriers
    /// with nothing to store still succeed).
    failing: Arc<Mutex<Option<i32>>>,
}

impl Probe {
    pub fn new(bytes: Vec<u8>) -> Self {
        Probe {
            mem: Arc::new(MemFile::new(bytes)),
            reads: Default::default(),
            failing: Default::default(),
        }
    }

    /// Make every later change to the file fail with `errno` (None: succeed again).
    pub fn fail_writes(&self, errno: Option<i32>) {
        *self.failing.lock() = errno;
    }

    fn refuse_if_failing(&self) -> io::Result<()> {
        match *self.failing.lock() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    /// How many reads began at `offset`.
    pub fn reads_at(&self, offset: u64) -> usize {
        self.reads.lock().iter().filter(|r| r.0 == offset).count()
    }

    pub fn clear(&self) {
        self.reads.lock().clear();
    }
}

impl HostIo for Probe {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.reads.lock().push((offset, buf.len()));
        self.mem.read_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.refuse_if_failing()?;
        self.mem.write_all_at(data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.mem.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.refuse_if_failing()?;
        self.mem.punch_hole(offset, len)
    }

    fn start_writeback(&self) -> io::Result<()> {
        self.mem.start_writeback()
    }
}

/// A cluster-sized pattern that differs byte to byte, so a misplaced offset shows: byte `i` is
/// `seed` plus `i` modulo 251 (a prime, so the pattern does not repeat at powers of two).
pub(crate) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// A snapshot table entry whose L1 table is `l1_size` entries at `l1_table_offset`.
pub fn snapshot(l1_table_offset: u64, l1_size: u32) -> super::snapshot::Snapshot {
    super::snapshot::Snapshot {
        id: "1".into(),
        name: "s".into(),
        l1_table_offset,
        l1_size,
        disk_size: None,
        date_sec: 0,
        vm_state_size: 0,
    }
}
