//! Refcounts: the table of refcount-block offsets and the blocks themselves, loaded on demand into a
//! bounded cache where a changed block stays pinned until the commit pipeline stores it. Entry
//! widths are 1 to 64 bits; sub-byte entries are packed from the least significant bit, wider ones
//! are big-endian.

use super::pinned_lru::PinnedLru;
use super::table::OFFSET_MASK;
use super::words::{encode_words, read_words};
use super::FormatError;
use crate::error::{Error, Result};
use crate::io::HostFile;

/// Read entry `index` of a refcount block with entries of 2^order bits.
pub fn get_entry(block: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            u64::from(byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)
        }
        _ => {
            let width = 1usize << (order - 3);
            block[index * width..(index + 1) * width]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

/// Write entry `index`; `value` must fit in 2^order bits.
pub fn set_entry(block: &mut [u8], index: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let width = 1usize << (order - 3);
            let bytes = value.to_be_bytes();
            block[index * width..(index + 1) * width].copy_from_slice(&bytes[8 - width..]);
        }
    }
}

/// The largest refcount an entry of 2^order bits holds.
pub fn max_refcount(order: u32) -> u64 {
    if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Refcount blocks kept in memory by default (clean ones; dirty ones are pinned until stored).
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 20;

/// Clean refcount blocks kept at least, whatever the budget: an allocation touches the block of the
/// cluster it takes and, now and then, the block of a new block.
const MIN_CACHED_BLOCKS: usize = 2;

/// The refcount structures of one image: the whole table (at most 8 MiB, QEMU's limit) and the
/// blocks it names, read on demand into a bounded cache.
///
/// Memory: clean blocks are dropped least recently used first, past the cache's capacity. A block
/// changed by an allocation or a release is dirty and pinned until `write_dirty_blocks` (the commit
/// pipeline's store step, which puts the barriers around it) has written it: nothing else ever
/// writes a block, and no dirty block is dropped unwritten. Dirty blocks are as many as one batch
/// of commits touches, a handful.
#[derive(Debug)]
pub struct Refcounts {
    order: u32,
    cluster_bits: u32,
    /// Offsets of refcount blocks (0: none yet); grows when the table is relocated.
    table: Vec<u64>,
    /// Where the table lives and how many clusters it takes; changed by a relocation.
    table_offset: u64,
    table_clusters: u64,
    table_dirty: bool,
    /// Blocks by table index.
    blocks: PinnedLru<Vec<u8>>,
}

impl Refcounts {
    /// Read the table; blocks are read when first needed, and about `cache_bytes` of them kept.
    pub fn load(
        file: &HostFile,
        offset: u64,
        clusters: u64,
        cluster_bits: u32,
        order: u32,
        cache_bytes: u64,
    ) -> Result<Self> {
        let limit = super::header::MAX_REFTABLE_BYTES;
        let bytes = clusters
            .checked_mul(1 << cluster_bits)
            .filter(|&b| b <= limit)
            .ok_or_else(|| {
                crate::Error::new(
                    file.path(),
                    FormatError::TooLarge {
                        what: "refcount table",
                        size: clusters.saturating_mul(1 << cluster_bits),
                        limit,
                    },
                )
            })?;
        let raw = read_words(file, offset, bytes as usize / 8)?;
        let mut table = Vec::with_capacity(raw.len());
        for word in raw {
            let entry = word & OFFSET_MASK;
            if entry & ((1 << cluster_bits) - 1) != 0 {
                return Err(crate::Error::new(
                    file.path(),
                    FormatError::Misaligned {
                        what: "refcount block",
                        offset: entry,
                        align: 1 << cluster_bits,
                    },
                ));
            }
            table.push(entry);
        }
        Ok(Refcounts {
            order,
            cluster_bits,
            table,
            table_offset: offset,
            table_clusters: clusters,
            table_dirty: false,
            blocks: PinnedLru::new(Self::blocks_for(cache_bytes, cluster_bits)),
        })
    }

    fn blocks_for(cache_bytes: u64, cluster_bits: u32) -> usize {
        ((cache_bytes >> cluster_bits) as usize).max(MIN_CACHED_BLOCKS)
    }

    /// Keep about `cache_bytes` of clean blocks from now on.
    pub fn set_cache_bytes(&mut self, cache_bytes: u64) {
        self.blocks
            .set_capacity(Self::blocks_for(cache_bytes, self.cluster_bits));
    }

    /// Bytes of blocks in memory now, clean and dirty.
    pub fn cached_bytes(&self) -> u64 {
        let (clean, dirty) = self.blocks.len();
        ((clean + dirty) as u64) << self.cluster_bits
    }

    /// The most bytes of clean blocks kept.
    #[cfg(test)]
    pub fn cache_capacity_bytes(&self) -> u64 {
        (self.blocks.capacity() as u64) << self.cluster_bits
    }

    /// Clusters described by one refcount block.
    pub fn per_block(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    fn block_size(&self) -> usize {
        1 << self.cluster_bits
    }

    /// The offset of block `index`, if the table names one.
    fn block_offset(&self, index: u64) -> Option<u64> {
        self.table.get(index as usize).copied().filter(|&o| o != 0)
    }

    /// Block `index`, read into the cache if needed; None if the table has no block there.
    fn block(&mut self, file: &HostFile, index: u64) -> Result<Option<&Vec<u8>>> {
        let Some(offset) = self.block_offset(index) else {
            return Ok(None);
        };
        let size = self.block_size();
        self.blocks
            .get_or_load(index, || read_block(file, offset, size))
            .map(Some)
    }

    /// The refcount of host cluster `cluster` (0 where no block exists).
    pub fn get(&mut self, file: &HostFile, cluster: u64) -> Result<u64> {
        let per_block = self.per_block();
        let order = self.order;
        Ok(self
            .block(file, cluster / per_block)?
            .map_or(0, |b| get_entry(b, (cluster % per_block) as usize, order)))
    }

    /// Whether the block covering `cluster` exists (in the table).
    pub fn has_block_for(&self, cluster: u64) -> bool {
        self.block_offset(cluster / self.per_block()).is_some()
    }

    /// Set the refcount of `cluster`; its block must exist. Errors when `value` does not fit.
    pub fn set(&mut self, file: &HostFile, cluster: u64, value: u64) -> Result<()> {
        if value > max_refcount(self.order) {
            return Err(crate::Error::new(
                file.path(),
                FormatError::Unsupported("a refcount would overflow its width"),
            ));
        }
        let per_block = self.per_block();
        let index = cluster / per_block;
        let Some(offset) = self.block_offset(index) else {
            return Err(crate::Error::new(
                file.path(),
                FormatError::BadRefcount(cluster << self.cluster_bits),
            ));
        };
        let (order, size) = (self.order, self.block_size());
        let block = self
            .blocks
            .get_mut_dirty(index, || read_block(file, offset, size))?;
        set_entry(block, (cluster % per_block) as usize, order, value);
        Ok(())
    }

    /// Install a new, zeroed block `index` stored at `offset` (the caller sets its refcount).
    pub fn add_block(&mut self, index: u64, offset: u64) {
        if self.table.len() <= index as usize {
            self.table.resize(index as usize + 1, 0);
        }
        self.table[index as usize] = offset;
        self.blocks
            .insert_dirty(index, vec![0u8; self.block_size()]);
        self.table_dirty = true;
    }

    /// The first cluster in [from, end) with refcount 0, if any. Each block is read once and
    /// searched in memory; a range without a block has refcount 0 throughout.
    pub fn next_free(&mut self, file: &HostFile, from: u64, end: u64) -> Result<Option<u64>> {
        let per_block = self.per_block();
        let order = self.order;
        let mut at = from;
        while at < end {
            let index = at / per_block;
            let first = index * per_block;
            let stop = (first + per_block).min(end);
            let Some(block) = self.block(file, index)? else {
                return Ok(Some(at));
            };
            if let Some(i) =
                (at - first..stop - first).find(|&i| get_entry(block, i as usize, order) == 0)
            {
                return Ok(Some(first + i));
            }
            at = stop;
        }
        Ok(None)
    }

    /// For writing: every refcount block the table names must lie inside the file of `file_len`
    /// bytes, or an allocation would fail half-way through a commit (and any write with it); and
    /// no block may be named twice, or two ranges of clusters would share their refcounts (and a
    /// scan of the refcounts would take as long as the table is big, not the file).
    pub fn check_blocks_inside(&self, file: &HostFile, file_len: u64) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        for &offset in self.table.iter().filter(|&&o| o != 0) {
            if offset.checked_add(cs).is_none_or(|end| end > file_len) {
                return Err(crate::Error::new(
                    file.path(),
                    FormatError::BeyondEnd {
                        what: "refcount block",
                        offset,
                        len: cs,
                        file_len,
                    },
                ));
            }
        }
        let mut named: Vec<u64> = self.table.iter().copied().filter(|&o| o != 0).collect();
        named.sort_unstable();
        if let Some(pair) = named.windows(2).find(|w| w[0] == w[1]) {
            return Err(crate::Error::new(
                file.path(),
                FormatError::Overlap {
                    what: "refcount block",
                    offset: pair[0],
                },
            ));
        }
        Ok(())
    }

    /// The highest host cluster with a non-zero refcount, if any. The allocator hands out clusters
    /// only past it (or free ones below): a file truncated inside its data area still has clusters
    /// that tables reference beyond its end, and these must never be given out again.
    ///
    /// Bounded in memory and time by the file, not the table: blocks not in the cache are read one
    /// at a time into one buffer and not kept, and a block in a hole of the host file (all zeros)
    /// is not read at all.
    pub fn last_used_cluster(&mut self, file: &HostFile) -> Result<Option<u64>> {
        let per_block = self.per_block();
        let (order, size) = (self.order, self.block_size());
        let mut scratch = Vec::new();
        for index in (0..self.table.len() as u64).rev() {
            let Some(offset) = self.block_offset(index) else {
                continue;
            };
            let last = match self.blocks.get(index) {
                Some(block) => last_nonzero(block, order),
                None if file.is_hole(offset, size as u64) => None,
                None => {
                    scratch.resize(size, 0);
                    file.read_exact_at(offset, &mut scratch)?;
                    last_nonzero(&scratch, order)
                }
            };
            if let Some(i) = last {
                return Ok(Some(index * per_block + i));
            }
        }
        Ok(None)
    }

    /// Entries the on-disk table has room for.
    pub fn table_capacity(&self) -> u64 {
        (self.table_clusters << self.cluster_bits) / 8
    }

    /// Write every dirty block (not the table); written blocks become clean. Does not sync.
    pub fn write_dirty_blocks(&mut self, file: &HostFile) -> Result<()> {
        let Refcounts { table, blocks, .. } = self;
        blocks.store_dirty(|index, block| match table.get(index as usize) {
            Some(&offset) if offset != 0 => file.write_at(offset, block),
            // A dirty block always has its table entry (set, or installed with it).
            _ => Err(crate::Error::new(
                file.path(),
                FormatError::Unsupported("a dirty refcount block without a table entry"),
            )),
        })
    }

    /// Where the table lives: (offset, clusters).
    pub fn table_place(&self) -> (u64, u64) {
        (self.table_offset, self.table_clusters)
    }

    /// The table is to live in `clusters` clusters at `offset` (the allocator placed them): it is
    /// written there by the next `write_table`.
    pub fn move_table(&mut self, offset: u64, clusters: u64) {
        self.table_offset = offset;
        self.table_clusters = clusters;
        self.table_dirty = true;
    }

    /// Whether the table changed (new blocks, or a new place) since it was last written.
    pub fn table_dirty(&self) -> bool {
        self.table_dirty
    }

    /// The offsets of the refcount blocks the table names.
    pub fn block_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|&b| b != 0)
    }

    /// Write the table where it lives, if it changed; returns whether it did.
    pub fn write_table(&mut self, file: &HostFile) -> Result<bool> {
        if !self.table_dirty {
            return Ok(false);
        }
        let bytes = self.table_bytes().ok_or_else(|| {
            Error::new(
                file.path(),
                FormatError::Unsupported("the refcount table outgrew its clusters"),
            )
        })?;
        file.write_at(self.table_offset, &bytes)?;
        self.table_dirty = false;
        Ok(true)
    }

    /// The table as it is stored: big-endian entries, padded to its clusters. None if it outgrew
    /// them, which `ensure_block` prevents by growing the clusters first.
    fn table_bytes(&self) -> Option<Vec<u8>> {
        if self.table.len() as u64 > self.table_capacity() {
            return None;
        }
        let mut out = encode_words(&self.table);
        out.resize((self.table_clusters << self.cluster_bits) as usize, 0);
        Some(out)
    }
}

/// A refcount block of `size` bytes at `offset` (inside the file: see `check_blocks_inside`).
fn read_block(file: &HostFile, offset: u64, size: usize) -> Result<Vec<u8>> {
    let mut block = vec![0u8; size];
    file.read_exact_at(offset, &mut block)?;
    Ok(block)
}

/// The index of the last non-zero entry of `block` (entries of 2^order bits), if any.
fn last_nonzero(block: &[u8], order: u32) -> Option<u64> {
    let byte = block.iter().rposition(|&b| b != 0)?;
    let (first, last) = if order >= 3 {
        let i = byte >> (order - 3);
        (i, i)
    } else {
        let per_byte = 8 >> order;
        (byte * per_byte, byte * per_byte + per_byte - 1)
    };
    (first..=last)
        .rev()
        .find(|&i| get_entry(block, i, order) != 0)
        .map(|i| i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_refcount_table_larger_than_qemu_allows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let file = HostFile::open(&path, false).unwrap();
        for clusters in [u64::MAX, 1 << 52, (8 << 20) / 4096 + 1] {
            let err =
                Refcounts::load(&file, 4096, clusters, 12, 4, DEFAULT_CACHE_BYTES).unwrap_err();
            assert!(err.to_string().contains("refcount table"), "{err}");
        }
        assert_eq!(
            Refcounts::load(&file, 4096, 1, 12, 4, DEFAULT_CACHE_BYTES)
                .unwrap()
                .table
                .len(),
            512
        );
    }

    #[test]
    fn packs_sub_byte_refcounts_from_the_low_bits() {
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 0, 0, 1);
        set_entry(&mut block, 3, 0, 1);
        assert_eq!(block[0], 0b1001);
        set_entry(&mut block, 1, 1, 3);
        assert_eq!(get_entry(&block, 1, 1), 3);
        assert_eq!(block[0] & 0b1100, 0b1100);
        let mut nib = vec![0u8; 2];
        set_entry(&mut nib, 1, 2, 0xa);
        assert_eq!(nib[0], 0xa0);
        assert_eq!(get_entry(&nib, 1, 2), 0xa);
    }

    #[test]
    fn stores_wide_refcounts_big_endian() {
        let mut block = vec![0u8; 32];
        set_entry(&mut block, 1, 4, 0x1234);
        assert_eq!(&block[2..4], &[0x12, 0x34]);
        set_entry(&mut block, 1, 6, u64::MAX - 1);
        assert_eq!(get_entry(&block, 1, 6), u64::MAX - 1);
        set_entry(&mut block, 2, 5, 7);
        assert_eq!(&block[8..12], &[0, 0, 0, 7]);
    }

    /// A refcount table of one cluster at 0 naming `blocks` (offsets) in a file of `len` bytes.
    fn image_with_blocks(blocks: &[(u64, &[u8])], len: u64) -> (tempfile::TempDir, HostFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut bytes = vec![0u8; len as usize];
        for (i, (offset, content)) in blocks.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&offset.to_be_bytes());
            if *offset + 512 <= len {
                bytes[*offset as usize..*offset as usize + content.len()].copy_from_slice(content);
            }
        }
        std::fs::write(&path, bytes).unwrap();
        let file = HostFile::open(&path, false).unwrap();
        (dir, file)
    }

    #[test]
    fn finds_the_last_cluster_with_a_refcount_in_the_last_used_block() {
        // 512-byte clusters, 16-bit refcounts: 256 clusters per block. Block 0 at 512 has
        // clusters 0..=3 used; block 1 at 1024 has cluster 256 + 7 used; block 2 at 1536 is empty.
        let mut b0 = vec![0u8; 512];
        for i in 0..4 {
            set_entry(&mut b0, i, 4, 1);
        }
        let mut b1 = vec![0u8; 512];
        set_entry(&mut b1, 7, 4, 2);
        let (_dir, file) = image_with_blocks(&[(512, &b0), (1024, &b1), (1536, &[0; 512])], 2048);
        let mut rc = Refcounts::load(&file, 0, 1, 9, 4, DEFAULT_CACHE_BYTES).unwrap();
        assert_eq!(rc.last_used_cluster(&file).unwrap(), Some(256 + 7));
    }

    #[test]
    fn an_image_without_used_clusters_has_no_last_used_cluster() {
        let (_dir, file) = image_with_blocks(&[(512, &[0; 512])], 1024);
        let mut rc = Refcounts::load(&file, 0, 1, 9, 4, DEFAULT_CACHE_BYTES).unwrap();
        assert_eq!(rc.last_used_cluster(&file).unwrap(), None);
    }

    #[test]
    fn a_refcount_block_past_the_end_of_the_file_is_refused_for_writing() {
        let (_dir, file) = image_with_blocks(&[(512, &[0; 512]), (4096, &[])], 1024);
        let rc = Refcounts::load(&file, 0, 1, 9, 4, DEFAULT_CACHE_BYTES).unwrap();
        let err = rc.check_blocks_inside(&file, 1024).unwrap_err().to_string();
        assert!(err.contains("refcount block"), "{err}");
        assert!(rc.check_blocks_inside(&file, 8192).is_ok());
    }

    /// 512-byte clusters with 16-bit refcounts (256 clusters per block): a table at 0 naming
    /// `blocks` blocks at 512, 1024, ..., block 0 counting clusters 0..=`used`, in a sparse file.
    fn sparse_image(blocks: u64, used: usize) -> (tempfile::TempDir, HostFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut head = vec![0u8; 1024];
        for i in 0..blocks {
            if i * 8 + 8 <= 512 {
                head[i as usize * 8..i as usize * 8 + 8]
                    .copy_from_slice(&(512 * (i + 1)).to_be_bytes());
            }
        }
        for c in 0..=used {
            set_entry(&mut head[512..], c, 4, 1);
        }
        std::fs::write(&path, &head).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(512 * (blocks + 1)).unwrap();
        let file = HostFile::open(&path, true).unwrap();
        (dir, file)
    }

    #[test]
    fn finding_the_last_used_cluster_keeps_no_block_in_memory() {
        let (_dir, file) = sparse_image(64, 3);
        let mut rc = Refcounts::load(&file, 0, 1, 9, 4, 4 * 512).unwrap();
        assert_eq!(rc.last_used_cluster(&file).unwrap(), Some(3));
        assert_eq!(rc.cached_bytes(), 0);
    }

    #[test]
    fn keeps_its_capacity_of_clean_blocks_and_every_dirty_one_until_stored() {
        let (_dir, file) = sparse_image(64, 3);
        let mut rc = Refcounts::load(&file, 0, 1, 9, 4, 4 * 512).unwrap();
        assert_eq!(rc.cache_capacity_bytes(), 4 * 512);
        for c in (0..64 * 256).step_by(100) {
            rc.get(&file, c).unwrap();
            assert!(rc.cached_bytes() <= 4 * 512);
        }
        // Ten blocks changed: all ten stay in memory, over the capacity, until stored.
        for b in 10..20u64 {
            rc.set(&file, b * 256 + 1, 7).unwrap();
        }
        assert!(rc.cached_bytes() >= 10 * 512);
        rc.write_dirty_blocks(&file).unwrap();
        assert!(rc.cached_bytes() <= 4 * 512);
        // What was stored is what a fresh load reads.
        let mut again = Refcounts::load(&file, 0, 1, 9, 4, 4 * 512).unwrap();
        for b in 10..20u64 {
            assert_eq!(again.get(&file, b * 256 + 1).unwrap(), 7);
            assert_eq!(again.get(&file, b * 256).unwrap(), 0);
        }
        assert_eq!(again.get(&file, 3).unwrap(), 1);
    }

    #[test]
    fn finds_the_next_free_cluster_past_full_blocks_and_in_missing_ones() {
        // Block 0 counts all of its 256 clusters as used; the table has no block 1.
        let mut full = vec![0u8; 512];
        for i in 0..256 {
            set_entry(&mut full, i, 4, 1);
        }
        let (_dir, file) = image_with_blocks(&[(512, &full)], 1024);
        let mut rc = Refcounts::load(&file, 0, 1, 9, 4, 0).unwrap();
        assert_eq!(rc.next_free(&file, 0, 1000).unwrap(), Some(256));
        assert_eq!(rc.next_free(&file, 10, 200).unwrap(), None);
        rc.set(&file, 100, 0).unwrap();
        assert_eq!(rc.next_free(&file, 10, 200).unwrap(), Some(100));
    }

    #[test]
    fn a_refcount_block_named_twice_is_refused_for_writing() {
        let (_dir, file) = image_with_blocks(&[(512, &[0; 512]), (1024, &[]), (512, &[])], 2048);
        let rc = Refcounts::load(&file, 0, 1, 9, 4, DEFAULT_CACHE_BYTES).unwrap();
        let err = rc.check_blocks_inside(&file, 2048).unwrap_err().to_string();
        assert!(
            err.contains("refcount block") && err.contains("0x200"),
            "{err}"
        );
    }

    #[test]
    fn knows_the_largest_refcount_per_width() {
        assert_eq!(max_refcount(0), 1);
        assert_eq!(max_refcount(4), 65535);
        assert_eq!(max_refcount(6), u64::MAX);
    }
}
