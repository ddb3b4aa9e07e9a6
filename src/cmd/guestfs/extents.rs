//! Where a file's bytes lie, read from its inode (layout.rs): the extent tree of ext4 or the
//! indirect block pointers of ext2/3, walked forward as a stream of [`Extent`]s in strictly
//! increasing file order, so a hostile map that repeats or reorders itself is an error, and the
//! work is bounded by the blocks of the file system, never by the file's claimed size. Holes are
//! simply absent (as are unwritten extents, which read as zeros). Also the plain scan of a
//! folder's entries with their inode numbers, which ext4-view does not expose.

use super::layout::{Layout, LayoutError, MapKind, RawInode};

/// The extent tree header's magic.
const EXTENT_MAGIC: u16 = 0xf30a;
/// ext4 trees are at most 5 levels deep below the inode.
const MAX_EXTENT_DEPTH: u16 = 5;
/// An extent longer than this is unwritten (reads as zeros); its length is the excess.
const UNWRITTEN: u16 = 32768;
/// Direct pointers in `i_block`, then single, double and triple indirect ones.
const DIRECT: usize = 12;

type Result<T> = std::result::Result<T, LayoutError>;

/// `len` blocks of the file from block `logical` lie at block `physical` of the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

/// One node of a walk: its entries (12 bytes each, or 4-byte pointers) and the next to visit.
struct Node {
    bytes: Vec<u8>,
    next: usize,
    count: usize,
    /// Extent trees: the node's depth (0: a leaf). Indirect maps: levels of pointers below.
    depth: u16,
    /// Indirect maps: the first file block this node covers.
    first: u64,
}

/// The extents of one file, in file order, up to its size.
pub(crate) struct Extents<'a> {
    layout: &'a Layout,
    kind: MapKind,
    stack: Vec<Node>,
    /// File blocks below this have been handed out (or skipped as a hole).
    done: u64,
    /// The file's size in blocks: nothing at or past it is read.
    end: u64,
    /// An indirect map's run being gathered (adjacent single blocks join into one extent).
    pending: Option<Extent>,
    /// Blocks handed out: never more than the file system has (a map that repeats a block of
    /// pointers would otherwise name the same blocks again and again).
    mapped: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl<'a> Extents<'a> {
    /// The extents of `inode`; an error for an inode whose bytes are stored inline.
    pub fn new(layout: &'a Layout, inode: &RawInode) -> Result<Extents<'a>> {
        let end = inode.size.div_ceil(layout.block_size());
        let mut e = Extents {
            layout,
            kind: inode.kind,
            stack: Vec::new(),
            done: 0,
            end,
            pending: None,
            mapped: 0,
        };
        match inode.kind {
            MapKind::Inline => return Err(LayoutError::BadMap("the bytes are inline")),
            MapKind::Extents => {
                let root = e.extent_node(inode.block.to_vec(), None)?;
                e.stack.push(root);
            }
            MapKind::Indirect => {
                // The direct pointers, then each indirect one with its levels below.
                let pointers: Vec<u8> = inode.block[..DIRECT * 4].to_vec();
                e.stack.push(Node {
                    bytes: pointers,
                    next: 0,
                    count: DIRECT,
                    depth: 0,
                    first: 0,
                });
                e.indirect_roots(&inode.block);
            }
        }
        Ok(e)
    }

    /// Queue the single, double and triple indirect pointers (visited after the direct ones:
    /// the stack is popped from its end, so they go in last first).
    fn indirect_roots(&mut self, block: &[u8; 60]) {
        let per = self.layout.block_size() / 4;
        let mut first = DIRECT as u64;
        let mut roots = Vec::new();
        for level in 1..=3u16 {
            let pointer = block[(DIRECT + level as usize - 1) * 4..][..4].to_vec();
            roots.push(Node {
                bytes: pointer,
                next: 0,
                count: 1,
                depth: level,
                first,
            });
            first = first.saturating_add(per.saturating_pow(u32::from(level)));
        }
        let direct = self.stack.pop();
        self.stack.extend(roots.into_iter().rev());
        self.stack.extend(direct);
    }

    /// An extent tree node from its bytes, its header checked (`depth`: what its parent says).
    fn extent_node(&self, bytes: Vec<u8>, depth: Option<u16>) -> Result<Node> {
        let magic = u16_at(&bytes, 0);
        let count = usize::from(u16_at(&bytes, 2));
        let node_depth = u16_at(&bytes, 6);
        if magic != EXTENT_MAGIC {
            return Err(LayoutError::BadMap("an extent node has no magic"));
        }
        if 12 + count * 12 > bytes.len() || node_depth > MAX_EXTENT_DEPTH {
            return Err(LayoutError::BadMap(
                "an extent node is larger than its block",
            ));
        }
        if depth.is_some_and(|d| d != node_depth) {
            return Err(LayoutError::BadMap("an extent node has the wrong depth"));
        }
        Ok(Node {
            bytes,
            next: 0,
            count,
            depth: node_depth,
            first: 0,
        })
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.layout.block_size() as usize];
        self.layout.read_block(block, &mut b)?;
        Ok(b)
    }

    /// The next extent of an extent tree, or None at its end.
    fn next_extent(&mut self) -> Result<Option<Extent>> {
        while let Some(node) = self.stack.last_mut() {
            if node.next == node.count {
                self.stack.pop();
                continue;
            }
            let at = 12 + node.next * 12;
            node.next += 1;
            let e = &node.bytes[at..at + 12];
            let logical = u64::from(u32_at(e, 0));
            if logical < self.done {
                return Err(LayoutError::BadMap("extents overlap or are out of order"));
            }
            if node.depth > 0 {
                let child = u64::from(u32_at(e, 4)) | u64::from(u16_at(e, 8)) << 32;
                let depth = node.depth - 1;
                let bytes = self.read_block(child)?;
                let child = self.extent_node(bytes, Some(depth))?;
                self.stack.push(child);
                continue;
            }
            let raw_len = u16_at(e, 4);
            let physical = u64::from(u32_at(e, 8)) | u64::from(u16_at(e, 6)) << 32;
            let (len, unwritten) = match raw_len > UNWRITTEN {
                true => (u64::from(raw_len - UNWRITTEN), true),
                false => (u64::from(raw_len), false),
            };
            if len == 0 {
                return Err(LayoutError::BadMap("an extent is empty"));
            }
            self.done = logical + len;
            if unwritten {
                continue;
            }
            self.layout.block_offset(physical)?;
            self.layout.block_offset(physical + len - 1)?;
            return Ok(Some(Extent {
                logical,
                physical,
                len,
            }));
        }
        Ok(None)
    }

    /// The next mapped block of an indirect map (its file block and block), or None. A node's
    /// `depth` counts the blocks of pointers between its pointers and the data.
    fn next_block(&mut self) -> Result<Option<(u64, u64)>> {
        let per = self.layout.block_size() / 4;
        while let Some(node) = self.stack.last_mut() {
            if node.next == node.count || node.first >= self.end {
                self.stack.pop();
                continue;
            }
            let i = node.next as u64;
            node.next += 1;
            let pointer = u64::from(u32_at(&node.bytes, node.next * 4 - 4));
            let span = per.saturating_pow(u32::from(node.depth));
            let first = node.first.saturating_add(i.saturating_mul(span));
            if pointer == 0 || first >= self.end {
                continue;
            }
            self.layout.block_offset(pointer)?;
            if node.depth == 0 {
                return Ok(Some((first, pointer)));
            }
            let depth = node.depth - 1;
            let bytes = self.read_block(pointer)?;
            self.stack.push(Node {
                bytes,
                next: 0,
                count: per as usize,
                depth,
                first,
            });
        }
        Ok(None)
    }

    /// The next extent of an indirect map: adjacent blocks joined.
    fn next_run(&mut self) -> Result<Option<Extent>> {
        loop {
            let Some((logical, physical)) = self.next_block()? else {
                return Ok(self.pending.take());
            };
            match &mut self.pending {
                Some(p) if p.logical + p.len == logical && p.physical + p.len == physical => {
                    p.len += 1;
                }
                _ => {
                    let run = Extent {
                        logical,
                        physical,
                        len: 1,
                    };
                    if let Some(done) = self.pending.replace(run) {
                        return Ok(Some(done));
                    }
                }
            }
        }
    }

    /// The next extent, cut at the file's size.
    pub fn next(&mut self) -> Result<Option<Extent>> {
        let next = match self.kind {
            MapKind::Extents => self.next_extent()?,
            _ => self.next_run()?,
        };
        let Some(mut e) = next.filter(|e| e.logical < self.end) else {
            return Ok(None);
        };
        e.len = e.len.min(self.end - e.logical);
        self.mapped += e.len;
        if self.mapped > self.layout.blocks() {
            return Err(LayoutError::BadMap(
                "it maps more blocks than the file system has",
            ));
        }
        Ok(Some(e))
    }
}

/// The entries of folder `inode` as (name, inode number), in the order they are stored (the
/// order ext4-view reads them), unused slots left out, at most `limit`.
pub(crate) fn dir_entries(
    layout: &Layout,
    inode: &RawInode,
    limit: usize,
) -> Result<Vec<(Vec<u8>, u32)>> {
    let bs = layout.block_size() as usize;
    let mut extents = Extents::new(layout, inode)?;
    let mut out = Vec::new();
    let mut block = vec![0u8; bs];
    while let Some(e) = extents.next()? {
        for i in 0..e.len {
            layout.read_block(e.physical + i, &mut block)?;
            let mut at = 0;
            while at + 8 <= bs {
                let ino = u32_at(&block, at);
                let rec_len = usize::from(u16_at(&block, at + 4));
                let name_len = usize::from(block[at + 6]);
                if rec_len < 8 || at + rec_len > bs || 8 + name_len > rec_len {
                    return Err(LayoutError::BadMap("a folder entry is damaged"));
                }
                if ino != 0 {
                    if out.len() == limit {
                        return Err(LayoutError::BadMap("a folder has too many entries"));
                    }
                    out.push((block[at + 8..at + 8 + name_len].to_vec(), ino));
                }
                at += rec_len;
            }
        }
    }
    Ok(out)
}
