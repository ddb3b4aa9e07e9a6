//! What ext4-view does not tell: inode numbers and where a file's blocks lie. qcowfs reads these
//! few on-disk records itself — the superblock's geometry, a group descriptor's inode table, an
//! inode's size, link count and block map (extents.rs walks the map) — so that `copy-out` can
//! visit a folder once, keep hard links, and skip a sparse file's holes. It is a cross-check,
//! never the only reader: an inode is used only when its fields agree with what ext4-view read
//! for the same path (`agrees`), so a journal that ext4-view replays, or a layout read wrongly,
//! costs the speed-up, never the bytes. Layouts it does not read (meta_bg) give no [`Layout`].

use std::sync::Arc;

use ext4_view::Metadata;

use crate::disk::BlockDevice;

/// An inode's bytes that qcowfs reads (the classic 128-byte inode).
const INODE_BYTES: usize = 128;
/// Most bytes of a large inode read to find its in-inode attributes (the space after
/// `i_extra_isize`; inodes are 256 bytes by default).
const LARGE_INODE_BYTES: usize = 1024;
/// The magic before attributes stored in the inode itself.
const IN_INODE_XATTR_MAGIC: u32 = 0xea02_0000;
/// Superblock `s_feature_incompat` bits.
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
/// Inode `i_flags` bits.
const FLAG_EXTENTS: u32 = 0x8_0000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;
/// The file type bits of `i_mode`.
const MODE_TYPE: u16 = 0o170_000;

pub use super::error::LayoutError;

type Result<T> = std::result::Result<T, LayoutError>;

/// The geometry of one ext2/3/4 file system, checked against the byte range it lies in; reads
/// never leave that range.
pub(crate) struct Layout {
    device: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
    block_size: u64,
    blocks: u64,
    inodes: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    /// The block after the superblock's: where the group descriptors start.
    descriptors: u64,
}

/// How a file's blocks are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapKind {
    /// An extent tree rooted in `i_block`.
    Extents,
    /// ext2/3 direct and indirect block pointers in `i_block`.
    Indirect,
    /// The bytes are in the inode itself (or its extended attributes): no blocks.
    Inline,
}

/// The fields of one inode that qcowfs uses.
#[derive(Debug, Clone)]
pub(crate) struct RawInode {
    pub number: u32,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: u32,
    pub links: u16,
    pub kind: MapKind,
    /// The 60 bytes of `i_block`: an extent tree's root, or 15 block pointers.
    pub block: [u8; 60],
    /// Whether it may have extended attributes (an attribute block, or attributes in the
    /// inode, or a large inode not wholly read): false only when it has none.
    pub xattrs: bool,
}

impl RawInode {
    /// Whether ext4-view read the same inode for this path: type, mode, owner, size, mtime.
    pub fn agrees(&self, meta: &Metadata) -> bool {
        let kind_agrees = match self.mode & MODE_TYPE {
            0o040_000 => meta.is_dir(),
            0o100_000 => meta.file_type().is_regular_file(),
            0o120_000 => meta.is_symlink(),
            _ => false,
        };
        kind_agrees
            && self.mode & 0o7777 == meta.mode()
            && self.uid == meta.uid()
            && self.gid == meta.gid()
            && self.size == meta.len()
            && i64::from(self.mtime) == meta.modified().seconds() & 0xffff_ffff
    }
}

/// Whether the inode `b` (all its bytes, or the first [`LARGE_INODE_BYTES`]) may have extended
/// attributes: an attribute block (`i_file_acl`), or the in-inode magic after `i_extra_isize`.
fn may_have_xattrs(b: &[u8]) -> bool {
    let block = u64::from(u32_at(b, 0x68)) | u64::from(u16_at(b, 0x76)) << 32;
    if block != 0 {
        return true;
    }
    if b.len() <= INODE_BYTES {
        return false;
    }
    let magic_at = INODE_BYTES + usize::from(u16_at(b, INODE_BYTES));
    match b.get(magic_at..magic_at + 4) {
        Some(m) => u32_at(m, 0) == IN_INODE_XATTR_MAGIC,
        // Beyond what was read: let the attribute reader look.
        None => true,
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl Layout {
    /// The layout of the file system in `len` bytes of `device` from `start`, from its
    /// superblock; None when it is one qcowfs does not read itself.
    pub fn load(device: Arc<dyn BlockDevice>, start: u64, len: u64) -> Option<Layout> {
        let mut sb = [0u8; 1024];
        if len < 2048 || device.read_at(start + 1024, &mut sb).is_err() {
            return None;
        }
        let incompat = u32_at(&sb, 0x60);
        let log = u32_at(&sb, 0x18);
        if u16_at(&sb, 0x38) != 0xef53 || log > 6 || incompat & INCOMPAT_META_BG != 0 {
            return None;
        }
        let block_size = 1024u64 << log;
        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks = u64::from(u32_at(&sb, 0x4))
            | if is_64bit {
                u64::from(u32_at(&sb, 0x150)) << 32
            } else {
                0
            };
        let inode_size = match u32_at(&sb, 0x4c) {
            0 => 128,
            _ => u64::from(u16_at(&sb, 0x58)),
        };
        let desc_size = match is_64bit {
            true => u64::from(u16_at(&sb, 0xfe)),
            false => 32,
        };
        let inodes_per_group = u64::from(u32_at(&sb, 0x28));
        let sound = blocks.checked_mul(block_size).is_some_and(|b| b <= len)
            && (INODE_BYTES as u64..=block_size).contains(&inode_size)
            && inode_size.is_power_of_two()
            && (32..=block_size).contains(&desc_size)
            && desc_size.is_power_of_two()
            && inodes_per_group > 0;
        if !sound {
            return None;
        }
        Some(Layout {
            device,
            start,
            len,
            block_size,
            blocks,
            inodes: u64::from(u32_at(&sb, 0x0)),
            inodes_per_group,
            inode_size,
            desc_size,
            descriptors: u64::from(u32_at(&sb, 0x14)) + 1,
        })
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// How many blocks the file system has.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The byte of the file system where block `block` starts, checked to lie inside it.
    pub fn block_offset(&self, block: u64) -> Result<u64> {
        if block == 0 || block >= self.blocks {
            return Err(LayoutError::PastEnd(block));
        }
        Ok(block * self.block_size)
    }

    /// Read `buf.len()` bytes at byte `offset` of the file system.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(LayoutError::PastEnd(offset / self.block_size));
        }
        self.device
            .read_at(self.start + offset, buf)
            .map_err(|e| LayoutError::Disk(e.to_string()))
    }

    /// Block `block` into `buf` (one block long).
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.block_offset(block)?;
        self.read(at, buf)
    }

    /// Inode `number` as stored in its group's inode table.
    pub fn inode(&self, number: u32) -> Result<RawInode> {
        let index = u64::from(number)
            .checked_sub(1)
            .filter(|&i| i < self.inodes)
            .ok_or(LayoutError::NoInode(number))?;
        let group = index / self.inodes_per_group;
        let mut desc = [0u8; 64];
        let desc = &mut desc[..self.desc_size.min(64) as usize];
        let desc_at = self
            .block_offset(self.descriptors)?
            .checked_add(group * self.desc_size)
            .ok_or(LayoutError::NoInode(number))?;
        self.read(desc_at, desc)?;
        let mut table = u64::from(u32_at(desc, 0x8));
        if desc.len() >= 64 {
            table |= u64::from(u32_at(desc, 0x28)) << 32;
        }
        let at = self
            .block_offset(table)?
            .checked_add((index % self.inodes_per_group) * self.inode_size)
            .ok_or(LayoutError::NoInode(number))?;
        let mut whole = [0u8; LARGE_INODE_BYTES];
        let read = (self.inode_size as usize).min(LARGE_INODE_BYTES);
        self.read(at, &mut whole[..read])?;
        let b = &whole[..INODE_BYTES];
        let flags = u32_at(b, 0x20);
        let kind = if flags & FLAG_INLINE_DATA != 0 {
            MapKind::Inline
        } else if flags & FLAG_EXTENTS != 0 {
            MapKind::Extents
        } else {
            MapKind::Indirect
        };
        let mut block = [0u8; 60];
        block.copy_from_slice(&b[0x28..0x28 + 60]);
        Ok(RawInode {
            number,
            mode: u16_at(b, 0x0),
            uid: u32::from(u16_at(b, 0x2)) | u32::from(u16_at(b, 0x78)) << 16,
            gid: u32::from(u16_at(b, 0x18)) | u32::from(u16_at(b, 0x7a)) << 16,
            size: u64::from(u32_at(b, 0x4)) | u64::from(u32_at(b, 0x6c)) << 32,
            mtime: u32_at(b, 0x10),
            links: u16_at(b, 0x1a),
            kind,
            block,
            xattrs: may_have_xattrs(&whole[..read]),
        })
    }
}
