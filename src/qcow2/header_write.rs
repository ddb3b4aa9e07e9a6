//! Changes to the header itself, each one in-place write followed by a barrier: clearing the
//! autoclear features before the first write, and dropping the backing file after `seal`. The
//! metadata lock is taken only to publish the new fields.

use super::header::{self, HeaderUpdate};
use super::image::Qcow2Image;
use crate::error::Result;

impl Qcow2Image {
    /// Writers that do not understand the autoclear features must clear them (e.g. bitmaps go
    /// stale). Done once, before the first commit's tables.
    pub(super) fn clear_autoclear(&self) -> Result<()> {
        {
            let meta = self.meta.lock();
            if meta.autoclear_cleared || meta.header.autoclear == 0 {
                return Ok(());
            }
        }
        let (at, bytes) = HeaderUpdate::Autoclear(0).encode();
        self.file.write_at(at, &bytes)?;
        self.barrier()?;
        let mut meta = self.meta.lock();
        meta.header.autoclear = 0;
        meta.autoclear_cleared = true;
        Ok(())
    }

    /// Make the image stand alone: clear the backing file name, then drop the backing-format
    /// extension. Each step is one write inside the header cluster followed by a barrier; a crash
    /// between them leaves only a stale, ignored backing-format extension.
    pub fn drop_backing_file(&self) -> Result<()> {
        let cs = self.layout.cluster_size() as usize;
        let start = self.meta.lock().header.header_length as usize;
        // Backing file offset (u64) and size (u32), both in the first sector.
        let (at, bytes) = HeaderUpdate::BackingFile { offset: 0, size: 0 }.encode();
        self.file.write_at(at, &bytes)?;
        self.barrier()?;
        {
            let mut meta = self.meta.lock();
            meta.header.backing_file = None;
            meta.header.backing_format = None;
        }
        let mut first = vec![0u8; cs];
        self.file.read_at(0, &mut first)?;
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
        self.barrier()
    }
}
