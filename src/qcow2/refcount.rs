//! Refcounts: the table of refcount-block offsets and the blocks themselves, loaded on demand and kept
//! in memory with a dirty mark until the flush writer stores them. Entry widths are 1 to 64 bits;
//! sub-byte entries are packed from the least significant bit, wider ones are big-endian.

use std::collections::{BTreeSet, HashMap};

use super::table::OFFSET_MASK;
use super::words::{encode_words, read_words};
use super::FormatError;
use crate::error::Result;
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

/// The refcount structures of one image, as far as they have been read.
#[derive(Debug)]
pub struct Refcounts {
    pub order: u32,
    cluster_bits: u32,
    /// Offsets of refcount blocks (0: none yet); grows when the table is relocated.
    pub table: Vec<u64>,
    /// Where the table lives and how many clusters it takes; changed by a relocation.
    pub table_offset: u64,
    pub table_clusters: u64,
    pub table_dirty: bool,
    blocks: HashMap<u64, Vec<u8>>,
    pub dirty_blocks: BTreeSet<u64>,
}

impl Refcounts {
    pub fn load(
        file: &HostFile,
        offset: u64,
        clusters: u64,
        cluster_bits: u32,
        order: u32,
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
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
        })
    }

    /// Clusters described by one refcount block.
    pub fn per_block(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    fn block_size(&self) -> usize {
        1 << self.cluster_bits
    }

    /// Make sure block `index` is in memory; false if the table has no block there.
    fn ensure_loaded(&mut self, file: &HostFile, index: u64) -> Result<bool> {
        if self.blocks.contains_key(&index) {
            return Ok(true);
        }
        let Some(&offset) = self.table.get(index as usize) else {
            return Ok(false);
        };
        if offset == 0 {
            return Ok(false);
        }
        let mut block = vec![0u8; self.block_size()];
        file.read_exact_at(offset, &mut block)?;
        self.blocks.insert(index, block);
        Ok(true)
    }

    /// The refcount of host cluster `cluster` (0 where no block exists).
    pub fn get(&mut self, file: &HostFile, cluster: u64) -> Result<u64> {
        let index = cluster / self.per_block();
        if !self.ensure_loaded(file, index)? {
            return Ok(0);
        }
        let order = self.order;
        let per_block = self.per_block();
        Ok(self
            .blocks
            .get(&index)
            .map_or(0, |b| get_entry(b, (cluster % per_block) as usize, order)))
    }

    /// Whether the block covering `cluster` exists (in the table).
    pub fn has_block_for(&self, cluster: u64) -> bool {
        let index = cluster / self.per_block();
        self.table.get(index as usize).is_some_and(|&o| o != 0)
    }

    /// Set the refcount of `cluster`; its block must exist. Errors when `value` does not fit.
    pub fn set(&mut self, file: &HostFile, cluster: u64, value: u64) -> Result<()> {
        if value > max_refcount(self.order) {
            return Err(crate::Error::new(
                file.path(),
                FormatError::Unsupported("a refcount would overflow its width"),
            ));
        }
        let index = cluster / self.per_block();
        if !self.ensure_loaded(file, index)? {
            return Err(crate::Error::new(
                file.path(),
                FormatError::BadRefcount(cluster << self.cluster_bits),
            ));
        }
        let order = self.order;
        let per_block = self.per_block();
        if let Some(block) = self.blocks.get_mut(&index) {
            set_entry(block, (cluster % per_block) as usize, order, value);
        }
        self.dirty_blocks.insert(index);
        Ok(())
    }

    /// Install a new, zeroed block `index` stored at `offset` (the caller sets its refcount).
    pub fn add_block(&mut self, index: u64, offset: u64) {
        if self.table.len() <= index as usize {
            self.table.resize(index as usize + 1, 0);
        }
        self.table[index as usize] = offset;
        self.blocks.insert(index, vec![0u8; self.block_size()]);
        self.dirty_blocks.insert(index);
        self.table_dirty = true;
    }

    /// For writing: every refcount block the table names must lie inside the file of `file_len`
    /// bytes, or an allocation would fail half-way through a commit (and any write with it).
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
        Ok(())
    }

    /// The highest host cluster with a non-zero refcount, if any. The allocator hands out clusters
    /// only past it (or free ones below): a file truncated inside its data area still has clusters
    /// that tables reference beyond its end, and these must never be given out again.
    pub fn last_used_cluster(&mut self, file: &HostFile) -> Result<Option<u64>> {
        let per_block = self.per_block();
        for index in (0..self.table.len() as u64).rev() {
            if !self.ensure_loaded(file, index)? {
                continue;
            }
            let order = self.order;
            let Some(block) = self.blocks.get(&index) else {
                continue;
            };
            if let Some(i) = (0..per_block as usize)
                .rev()
                .find(|&i| get_entry(block, i, order) != 0)
            {
                return Ok(Some(index * per_block + i as u64));
            }
        }
        Ok(None)
    }

    /// Entries the on-disk table has room for.
    pub fn table_capacity(&self) -> u64 {
        (self.table_clusters << self.cluster_bits) / 8
    }

    /// Write every dirty block (not the table). Does not sync.
    pub fn write_dirty_blocks(&mut self, file: &HostFile) -> Result<()> {
        for &index in &self.dirty_blocks {
            if let (Some(block), Some(&offset)) =
                (self.blocks.get(&index), self.table.get(index as usize))
            {
                file.write_at(offset, block)?;
            }
        }
        self.dirty_blocks.clear();
        Ok(())
    }

    /// The table as it is stored: big-endian entries, padded to its clusters. None if it outgrew
    /// them, which `ensure_block` prevents by growing the clusters first.
    pub fn table_bytes(&self) -> Option<Vec<u8>> {
        if self.table.len() as u64 > self.table_capacity() {
            return None;
        }
        let mut out = encode_words(&self.table);
        out.resize((self.table_clusters << self.cluster_bits) as usize, 0);
        Some(out)
    }
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
            let err = Refcounts::load(&file, 4096, clusters, 12, 4).unwrap_err();
            assert!(err.to_string().contains("refcount table"), "{err}");
        }
        assert_eq!(
            Refcounts::load(&file, 4096, 1, 12, 4).unwrap().table.len(),
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
        let mut rc = Refcounts::load(&file, 0, 1, 9, 4).unwrap();
        assert_eq!(rc.last_used_cluster(&file).unwrap(), Some(256 + 7));
    }

    #[test]
    fn an_image_without_used_clusters_has_no_last_used_cluster() {
        let (_dir, file) = image_with_blocks(&[(512, &[0; 512])], 1024);
        let mut rc = Refcounts::load(&file, 0, 1, 9, 4).unwrap();
        assert_eq!(rc.last_used_cluster(&file).unwrap(), None);
    }

    #[test]
    fn a_refcount_block_past_the_end_of_the_file_is_refused_for_writing() {
        let (_dir, file) = image_with_blocks(&[(512, &[0; 512]), (4096, &[])], 1024);
        let rc = Refcounts::load(&file, 0, 1, 9, 4).unwrap();
        let err = rc.check_blocks_inside(&file, 1024).unwrap_err().to_string();
        assert!(err.contains("refcount block"), "{err}");
        assert!(rc.check_blocks_inside(&file, 8192).is_ok());
    }

    #[test]
    fn knows_the_largest_refcount_per_width() {
        assert_eq!(max_refcount(0), 1);
        assert_eq!(max_refcount(4), 65535);
        assert_eq!(max_refcount(6), u64::MAX);
    }
}
