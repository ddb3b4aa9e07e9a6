//! NTFS as a [`Tree`], read by the rust-fs-ntfs crate's reader (its MFT, index and attribute
//! functions over our device; the disk is never written): names are matched as Windows
//! matches them (case-insensitively, by `$UpCase`), the metafiles (`$MFT`, `$LogFile`, ...)
//! are left out as Windows and ntfs-3g leave them out, symbolic links and junctions are shown
//! as links (their print name; an absolute one keeps its Windows form), alternate data streams
//! are not read, and an EFS-encrypted file is refused by name. NTFS has no Unix owners or
//! modes: entries show as ntfs-3g shows them without a user mapping (root, 0755 folders, 0644
//! files).

use std::sync::Arc;

use fs_ntfs::attr_io::AttrType;
use fs_ntfs::block_io::BlockIo;
use fs_ntfs::error::Kind as NtfsKind;
use fs_ntfs::read;

use super::device::RangeDevice;
use super::error::GuestError;
use super::tree::shown;
use super::tree::{FileData, FsError, FsResult, Kind, Meta, Node, Time, Tree};

/// `FILE_ATTRIBUTE_ENCRYPTED`: the file's data is EFS ciphertext.
const ENCRYPTED: u32 = 0x4000;

/// Reparse tags shown as links (`IO_REPARSE_TAG_SYMLINK`, `IO_REPARSE_TAG_MOUNT_POINT`).
const SYMLINK_TAG: u32 = 0xA000_000C;
const JUNCTION_TAG: u32 = 0xA000_0003;

/// An NTFS file system, open for reading.
pub(crate) struct NtfsTree {
    device: Arc<RangeDevice>,
}

/// The device as the NTFS reader wants it; writes refused.
struct Io(Arc<RangeDevice>);

impl BlockIo for Io {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        fs_core::BlockRead::read_at(self.0.as_ref(), offset, buf).map_err(|e| e.to_string())
    }
    fn write_all_at(&mut self, _: u64, _: &[u8]) -> Result<(), String> {
        Err("the guest file system is open read-only".into())
    }
    fn size(&self) -> u64 {
        self.0.len()
    }
}

impl NtfsTree {
    pub fn load(device: Arc<RangeDevice>) -> FsResult<NtfsTree> {
        let tree = NtfsTree { device };
        read::read_volume_info(&mut tree.io()).map_err(|e| tree.device.error(e))?;
        Ok(tree)
    }

    fn io(&self) -> Io {
        Io(self.device.clone())
    }

    fn record(node: Node) -> u64 {
        node.meta.id.unwrap_or(read::ROOT_RECORD_NUMBER)
    }

    /// The metadata of MFT record `record`.
    fn meta(&self, record: u64) -> FsResult<Meta> {
        let mut io = self.io();
        let st = read::read_stat(&mut io, record).map_err(|e| self.device.error(e))?;
        let time = |nt: u64| Time {
            secs: read::nt_to_unix(nt),
            nanos: (nt % 10_000_000) as u32 * 100,
        };
        let mut meta = Meta {
            kind: if st.is_dir { Kind::Dir } else { Kind::File },
            mode: if st.is_dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            len: st.size,
            atime: time(st.accessed_nt),
            mtime: time(st.modified_nt),
            links: u32::from(st.link_count),
            id: Some(record),
        };
        if let Some(target) = self.link_target(record)? {
            meta.kind = Kind::Symlink;
            meta.mode = 0o777;
            meta.len = target.len() as u64;
        } else if !st.is_dir && st.file_attributes & ENCRYPTED != 0 {
            // Kept as a file: reading it is refused with its name (see `open`).
            meta.mode = 0o600;
        }
        Ok(meta)
    }

    /// The target of record `record` when it is a symbolic link or a junction.
    fn link_target(&self, record: u64) -> FsResult<Option<String>> {
        let value = read::read_attribute_value_if_present(
            &mut self.io(),
            record,
            AttrType::ReparsePoint,
            None,
        )
        .map_err(|e| self.device.error(e))?;
        let Some(value) = value else {
            return Ok(None);
        };
        let tag = value
            .get(..4)
            .map(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]));
        if tag != Some(SYMLINK_TAG) && tag != Some(JUNCTION_TAG) {
            return Ok(None);
        }
        Ok(fs_ntfs::reparse_link_target(&value))
    }
}

impl Tree for NtfsTree {
    fn name(&self) -> &'static str {
        "NTFS"
    }

    fn root(&self) -> FsResult<Meta> {
        self.meta(read::ROOT_RECORD_NUMBER)
    }

    fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>> {
        // NTFS names are UTF-16: a name that is not text names nothing here.
        let (Some(dir_path), Ok(name)) = (dir.path.to_str(), std::str::from_utf8(name)) else {
            return Ok(None);
        };
        let path = format!("{}/{name}", dir_path.trim_end_matches('/'));
        match read::resolve_path(&mut self.io(), &path) {
            Ok(record) if record < read::FIRST_LISTED_RECORD => Ok(None),
            Ok(record) => self.meta(record).map(Some),
            Err(e) if e.kind() == NtfsKind::NotFound => Ok(None),
            Err(e) => Err(self.device.error(e)),
        }
    }

    fn read_dir(
        &self,
        dir: Node,
        each: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
    ) -> FsResult<()> {
        let entries = read::read_dir_entries(&mut self.io(), Self::record(dir))
            .map_err(|e| self.device.error(e))?;
        for e in entries.into_iter().filter(read::listed_to_hosts) {
            let meta = self.meta(e.record_number)?;
            each(e.name.into_bytes(), meta)?;
        }
        Ok(())
    }

    fn read_link(&self, link: Node) -> FsResult<Vec<u8>> {
        match self.link_target(Self::record(link))? {
            Some(t) => Ok(t.into_bytes()),
            None => Err(FsError::Library("not a symbolic link or junction".into())),
        }
    }

    fn open<'a>(&'a self, file: Node) -> FsResult<Box<dyn FileData + 'a>> {
        let record = Self::record(file);
        let st = read::read_stat(&mut self.io(), record).map_err(|e| self.device.error(e))?;
        if st.file_attributes & ENCRYPTED != 0 {
            return Err(GuestError::Encrypted(shown(file.path.as_bytes())).into());
        }
        Ok(Box::new(NtfsData {
            tree: self,
            record,
            len: file.meta.len,
        }))
    }

    fn max_dirs(&self) -> u64 {
        // Every folder is an MFT record, at least 1 KiB.
        (self.device.len() / 1024).max(1)
    }
}

struct NtfsData<'a> {
    tree: &'a NtfsTree,
    record: u64,
    len: u64,
}

impl FileData for NtfsData<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        buf.fill(0);
        let want = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(());
        }
        let data = read::read_attribute_range(
            &mut self.tree.io(),
            self.record,
            AttrType::Data,
            None,
            offset,
            want,
        )
        .map_err(|e| self.tree.device.error(e))?;
        let n = data.len().min(want);
        buf[..n].copy_from_slice(&data[..n]);
        Ok(())
    }
}
